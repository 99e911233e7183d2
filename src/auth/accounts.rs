//! Accounts: sign-up (the first user becomes the primary admin), sign-in, password and
//! profile changes, API keys, user administration and per-user/per-key limits.
//!
//! Everything goes through the storage seams (`Metadata`, `Counters`, `Signals`), so it
//! holds across replicas: sign-in attempts are counted in shared counters, and every change
//! that a replica's API-key cache could hold (a key deleted or replaced, a user's role,
//! sessions or limits changed, a user deleted) is published as a [`Signal`] after it is
//! stored. Handlers only parse requests and shape answers.

use std::net::IpAddr;
use std::time::Duration;

use super::{Auth, AuthError, Credential, Identity, password};
use crate::limits::Limits;
use crate::storage::{Signal, StorageError};
use crate::store::{ApiKeyRecord, Role, User, now_secs};

/// Longest email accepted (RFC 5321's path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest password accepted (argon2 would take any; nobody types more).
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Longest display name accepted.
const MAX_NAME_LEN: usize = 256;
/// Longest `profile_image_url` (Open WebUI's UI sends small data URLs).
const MAX_IMAGE_URL_LEN: usize = 16 * 1024;
/// Suggested wait when every password-hashing slot is taken.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why the primary admin cannot be changed by others or demoted.
pub const PRIMARY_ADMIN_PROTECTED: &str =
    "The primary (first) admin cannot be demoted, deleted or changed by another admin";

/// A trimmed, lowercased email of plausible shape.
///
/// # Errors
/// [`AuthError::Invalid`] naming the problem.
pub fn validate_email(email: &str) -> Result<String, AuthError> {
    let e = email.trim().to_lowercase();
    let valid = e.len() <= MAX_EMAIL_LEN
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !e.contains(char::is_whitespace)
        && !e.contains(char::is_control);
    if valid {
        Ok(e)
    } else {
        Err(AuthError::Invalid("Invalid email format".into()))
    }
}

/// # Errors
/// [`AuthError::Invalid`]: empty or longer than [`MAX_PASSWORD_LEN`].
pub fn validate_password(p: &str) -> Result<(), AuthError> {
    if p.is_empty() {
        return Err(AuthError::Invalid("Password must not be empty".into()));
    }
    if p.len() > MAX_PASSWORD_LEN {
        return Err(AuthError::Invalid(format!(
            "Password is too long ({MAX_PASSWORD_LEN} bytes at most)"
        )));
    }
    Ok(())
}

/// A trimmed, non-empty display name of bounded size.
///
/// # Errors
/// [`AuthError::Invalid`] naming the problem.
pub fn validate_name(name: &str) -> Result<String, AuthError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(AuthError::Invalid("Name must not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(AuthError::Invalid(format!(
            "Name is too long ({MAX_NAME_LEN} bytes at most)"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(AuthError::Invalid(
            "Name must not contain control characters".into(),
        ));
    }
    Ok(name.to_string())
}

/// # Errors
/// [`AuthError::Invalid`]: longer than 16 KiB.
pub fn validate_image_url(url: &str) -> Result<(), AuthError> {
    if url.len() > MAX_IMAGE_URL_LEN {
        return Err(AuthError::Invalid(
            "profile_image_url is too long (16 KiB at most)".into(),
        ));
    }
    Ok(())
}

/// # Errors
/// [`AuthError::Invalid`]: not `admin`, `user` or `pending`.
pub fn parse_role(role: &str) -> Result<Role, AuthError> {
    Role::parse(role).ok_or_else(|| {
        AuthError::Invalid(format!(
            "Invalid role {:?}: use admin, user or pending",
            role.chars().take(64).collect::<String>()
        ))
    })
}

/// A user to create.
pub struct NewUser {
    pub name: String,
    pub email: String,
    pub password: String,
    pub profile_image_url: Option<String>,
}

/// An admin's change to a user; `None` leaves a field as it is.
#[derive(Default)]
pub struct UserUpdate {
    pub role: Option<String>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub profile_image_url: Option<String>,
    pub password: Option<String>,
}

/// The account operations, over the [`Auth`] service's storage, limits and hashing gate.
pub struct Accounts<'a> {
    auth: &'a Auth,
}

impl<'a> Accounts<'a> {
    pub(super) fn new(auth: &'a Auth) -> Accounts<'a> {
        Accounts { auth }
    }

    /// Runs password work through the hashing gate: argon2 is deliberately slow and
    /// memory-hard and must neither stall the event loop nor run unbounded.
    async fn hashed<T, F>(&self, work: F) -> Result<T, AuthError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self.auth.hashing.run(work).await {
            Ok(v) => Ok(v),
            Err(password::GateError::Busy) => {
                crate::metrics::auth_failure("hashing_busy");
                tracing::debug!("password hashing queue full; attempt refused");
                Err(AuthError::HashingBusy(BUSY_RETRY_AFTER))
            }
            Err(password::GateError::Failed) => Err(AuthError::HashingFailed),
        }
    }

    /// # Errors
    /// The store failed.
    pub async fn users(&self) -> Result<Vec<User>, AuthError> {
        Ok(self.auth.meta.users().await?)
    }

    /// # Errors
    /// The store failed.
    pub async fn user(&self, id: &str) -> Result<Option<User>, AuthError> {
        Ok(self.auth.meta.user_by_id(id).await?)
    }

    /// # Errors
    /// The store failed.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<User>, AuthError> {
        Ok(self
            .auth
            .meta
            .user_by_email(&email.trim().to_lowercase())
            .await?)
    }

    /// `POST /auths/signup`: open while there is no user or sign-up is enabled; counted
    /// against the client address's sign-in budget; the first user becomes the admin.
    ///
    /// # Errors
    /// Sign-up disabled, too many attempts, an invalid field, a taken email, hashing
    /// overload, or a store failure.
    pub async fn sign_up(&self, new: NewUser, from: Option<IpAddr>) -> Result<User, AuthError> {
        if self.auth.meta.user_count().await? > 0 && !self.auth.config.enable_signup {
            return Err(AuthError::SignupDisabled);
        }
        if let Some(ip) = from {
            self.auth.limits.address(ip).await?;
        }
        let user = self
            .create_user(new, self.auth.config.default_user_role, true)
            .await?;
        tracing::info!(user = %user.id, role = user.role.as_str(), "user signed up");
        Ok(user)
    }

    /// Creates a user with a hashed password; with `first_is_admin`, the first user of the
    /// installation becomes its primary admin (decided atomically by the store).
    ///
    /// # Errors
    /// An invalid field, a taken email, hashing overload, or a store failure.
    pub async fn create_user(
        &self,
        new: NewUser,
        role: Role,
        first_is_admin: bool,
    ) -> Result<User, AuthError> {
        let email = validate_email(&new.email)?;
        validate_password(&new.password)?;
        let name = validate_name(&new.name)?;
        if let Some(u) = &new.profile_image_url {
            validate_image_url(u)?;
        }
        if self.auth.meta.user_by_email(&email).await?.is_some() {
            // Answered before hashing: a taken email costs no argon2 run.
            return Err(AuthError::EmailTaken);
        }
        let pw = new.password;
        let hash = self.hashed(move || password::hash(&pw)).await?;
        let mut user = User::new(&email, &name, role, hash);
        if let Some(url) = new.profile_image_url.filter(|u| !u.is_empty()) {
            user.profile_image_url = url;
        }
        match self.auth.meta.create_user(user, first_is_admin).await {
            Ok(u) => Ok(u),
            Err(StorageError::EmailTaken) => Err(AuthError::EmailTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// `WEBUI_ADMIN_EMAIL`/`WEBUI_ADMIN_PASSWORD`: the admin, created when no user exists.
    /// Hashes on the calling thread (start-up, before any request).
    ///
    /// # Errors
    /// The store failed.
    pub async fn bootstrap_admin(
        &self,
        email: &str,
        password: &str,
        name: &str,
    ) -> Result<Option<User>, AuthError> {
        if self.auth.meta.user_count().await? > 0 {
            return Ok(None);
        }
        let user = User::new(email, name, Role::Admin, password::hash(password));
        Ok(Some(self.auth.meta.create_user(user, true).await?))
    }

    /// `POST /auths/signin`: counted per client address and per email (on every replica),
    /// then verified; an unknown email is verified against a dummy hash, so the answer takes
    /// as long either way.
    ///
    /// # Errors
    /// Too many attempts, wrong credentials, hashing overload, or a store failure.
    pub async fn sign_in(
        &self,
        email: &str,
        password: String,
        from: Option<IpAddr>,
    ) -> Result<User, AuthError> {
        let email = email.trim().to_lowercase();
        // No email longer than this, or with a control character (which PostgreSQL text
        // cannot hold), can exist: refused before any store or counter work.
        if email.is_empty() || email.len() > MAX_EMAIL_LEN || email.contains(char::is_control) {
            return Err(AuthError::Invalid("Invalid email format".into()));
        }
        validate_password(&password)?;
        if let Some(ip) = from {
            self.auth.limits.address(ip).await?;
        }
        self.auth.limits.email(&email).await?;
        let user = self.auth.meta.user_by_email(&email).await?;
        let phc = user.as_ref().map(|u| u.password_hash.clone());
        // The dummy is made on the hashing threads too (the first time it is needed).
        let ok = self
            .hashed(move || match &phc {
                Some(phc) => password::verify(&password, phc),
                None => password::verify(&password, password::dummy_hash()),
            })
            .await?;
        match user {
            Some(u) if ok => {
                tracing::info!(user = %u.id, "user signed in");
                Ok(u)
            }
            _ => {
                crate::metrics::auth_failure("bad_password");
                Err(AuthError::InvalidCredentials)
            }
        }
    }

    /// `GET /auths/signout`: a session token is revoked (on every replica: the revocation
    /// is stored); an API key is not affected.
    ///
    /// # Errors
    /// The store failed.
    pub async fn sign_out(&self, credential: &Credential) -> Result<(), AuthError> {
        if let Credential::Jwt { jti, exp } = credential {
            self.auth.meta.revoke_token(jti, *exp).await?;
            self.auth
                .invalidate(Signal::TokenRevoked { jti: jti.clone() })
                .await?;
        }
        Ok(())
    }

    /// `POST /auths/update/password`: checks the current password (limited and hashed as a
    /// sign-in is), sets the new one and ends every other session of the user.
    ///
    /// # Errors
    /// An invalid password, too many attempts, a wrong current password, hashing overload,
    /// a user deleted meanwhile, or a store failure.
    pub async fn change_password(
        &self,
        id: &Identity,
        current: String,
        new: String,
        from: Option<IpAddr>,
    ) -> Result<(), AuthError> {
        validate_password(&current)?;
        validate_password(&new)?;
        if let Some(ip) = from {
            self.auth.limits.address(ip).await?;
        }
        self.auth.limits.email(&id.user.email).await?;
        let phc = id.user.password_hash.clone();
        let hash = self
            .hashed(move || password::verify(&current, &phc).then(|| password::hash(&new)))
            .await?;
        let Some(hash) = hash else {
            crate::metrics::auth_failure("bad_password");
            return Err(AuthError::IncorrectPassword);
        };
        let keep = match &id.credential {
            Credential::Jwt { jti, .. } => Some(jti.clone()),
            Credential::ApiKey => None,
        };
        self.change_own(
            &id.user.id,
            Box::new(move |u| {
                u.password_hash = hash;
                u.revoke_sessions(keep);
                Ok(())
            }),
        )
        .await?;
        tracing::info!(user = %id.user.id, "password changed; other sessions revoked");
        Ok(())
    }

    /// `POST /auths/update/profile`: name and picture.
    ///
    /// # Errors
    /// An invalid field, a user deleted meanwhile, or a store failure.
    pub async fn update_profile(
        &self,
        user_id: &str,
        name: &str,
        profile_image_url: Option<String>,
    ) -> Result<User, AuthError> {
        let name = validate_name(name)?;
        if let Some(u) = &profile_image_url {
            validate_image_url(u)?;
        }
        self.change_own(
            user_id,
            Box::new(move |u| {
                u.name = name;
                if let Some(url) = profile_image_url.filter(|u| !u.is_empty()) {
                    u.profile_image_url = url;
                }
                Ok(())
            }),
        )
        .await
    }

    /// Changes the caller's own account; a caller deleted meanwhile has no session left.
    async fn change_own(
        &self,
        user_id: &str,
        change: crate::storage::UserChange,
    ) -> Result<User, AuthError> {
        let user = match self.auth.meta.update_user(user_id, change).await {
            Ok(Ok(u)) => u,
            Ok(Err(refusal)) => return Err(AuthError::Invalid(refusal)),
            Err(StorageError::NoSuchUser) => return Err(AuthError::SessionExpired),
            Err(e) => return Err(e.into()),
        };
        self.user_changed(&user.id).await?;
        Ok(user)
    }

    /// Cached API keys carry their user: every replica reads it afresh.
    async fn user_changed(&self, id: &str) -> Result<(), AuthError> {
        self.auth
            .invalidate(Signal::UserChanged { id: id.to_string() })
            .await
    }

    /// Creates (or replaces) the user's API key; returns its plaintext, which is not
    /// stored and cannot be shown again.
    ///
    /// # Errors
    /// The user does not exist (any more), or the store failed.
    pub async fn create_key(
        &self,
        user_id: &str,
        models: Vec<String>,
        limits: Limits,
    ) -> Result<String, AuthError> {
        let key = super::generate_key();
        let record = ApiKeyRecord {
            user_id: user_id.to_string(),
            prefix: key.plaintext[..11].to_string(),
            created_at: now_secs(),
            models,
            limits,
        };
        match self.auth.meta.put_api_key(&key.hash, &record).await {
            Ok(()) => {}
            Err(StorageError::NoSuchUser) => {
                return Err(AuthError::NotFound("No such user".into()));
            }
            Err(e) => return Err(e.into()),
        }
        // The replaced key (whatever its hash) belongs to this user.
        self.user_changed(user_id).await?;
        Ok(key.plaintext)
    }

    /// `ragway key create`: replaces the key of the user with `email`.
    ///
    /// # Errors
    /// No such user, or the store failed.
    pub async fn create_key_for_email(
        &self,
        email: &str,
        models: Vec<String>,
    ) -> Result<String, AuthError> {
        let user = self
            .user_by_email(email)
            .await?
            .ok_or_else(|| AuthError::NotFound(format!("No user with email {email}")))?;
        self.create_key(&user.id, models, Limits::default()).await
    }

    /// The user's key record (prefix, models, limits).
    ///
    /// # Errors
    /// The store failed.
    pub async fn key_of(&self, user_id: &str) -> Result<Option<ApiKeyRecord>, AuthError> {
        Ok(self
            .auth
            .meta
            .api_key_of_user(user_id)
            .await?
            .map(|(_, r)| r))
    }

    /// Deletes the user's key; it stops working on every replica at once. Whether there
    /// was one.
    ///
    /// # Errors
    /// The store failed, or the deletion could not be signalled (a retry is safe).
    pub async fn delete_key(&self, user_id: &str) -> Result<bool, AuthError> {
        let Some(hash) = self.auth.meta.delete_api_key_of_user(user_id).await? else {
            return Ok(false);
        };
        self.auth.invalidate(Signal::KeyDeleted { hash }).await?;
        Ok(true)
    }

    /// `POST /users/{id}/update` by an admin: role (approving a pending user keeps their
    /// session; any other role change ends every session), name, email, picture, password
    /// (ends every session). The primary admin is changed only by themselves, and never
    /// demoted.
    ///
    /// # Errors
    /// No such user, an invalid field, the primary-admin rule, a taken email, hashing
    /// overload, or a store failure.
    pub async fn update_user(
        &self,
        caller: &User,
        target_id: &str,
        change: UserUpdate,
    ) -> Result<User, AuthError> {
        let not_found = || AuthError::NotFound(crate::error::msg::NOT_FOUND.into());
        let target = self
            .auth
            .meta
            .user_by_id(target_id)
            .await?
            .ok_or_else(not_found)?;
        let role = change.role.as_deref().map(parse_role).transpose()?;
        let name = change.name.as_deref().map(validate_name).transpose()?;
        let email = change.email.as_deref().map(validate_email).transpose()?;
        if let Some(url) = &change.profile_image_url {
            validate_image_url(url)?;
        }
        if let Some(p) = &change.password {
            validate_password(p)?;
        }
        if self.auth.meta.primary_admin().await?.as_deref() == Some(target.id.as_str())
            && (caller.id != target.id || role.is_some_and(|r| r != Role::Admin))
        {
            return Err(AuthError::Forbidden(PRIMARY_ADMIN_PROTECTED));
        }
        if let Some(e) = &email
            && *e != target.email
            && self.auth.meta.user_by_email(e).await?.is_some()
        {
            // Answered before hashing: a taken email costs no argon2 run.
            return Err(AuthError::EmailTaken);
        }
        let new_hash = match change.password {
            Some(p) => Some(self.hashed(move || password::hash(&p)).await?),
            None => None,
        };
        let image = change.profile_image_url;
        let apply: crate::storage::UserChange = Box::new(move |u| {
            if let Some(r) = role {
                // Approving a pending user grants more, so their waiting session carries
                // on; any other role change ends every session (Open WebUI keeps them).
                if r != u.role && u.role != Role::Pending {
                    u.revoke_sessions(None);
                }
                u.role = r;
            }
            if let Some(n) = name {
                u.name = n;
            }
            if let Some(e) = email {
                u.email = e;
            }
            if let Some(url) = image {
                u.profile_image_url = url;
            }
            if let Some(h) = new_hash {
                u.password_hash = h;
                u.revoke_sessions(None);
            }
            Ok(())
        });
        let user = match self.auth.meta.update_user(&target.id, apply).await {
            Ok(Ok(u)) => u,
            Ok(Err(refusal)) => return Err(AuthError::Invalid(refusal)),
            Err(StorageError::EmailTaken) => return Err(AuthError::EmailTaken),
            Err(StorageError::NoSuchUser) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        // The new role applies to the user's next request on every replica.
        self.user_changed(&user.id).await?;
        tracing::info!(admin = %caller.id, user = %user.id, role = user.role.as_str(), "user updated");
        Ok(user)
    }

    /// `DELETE /users/{id}` by an admin: not the primary admin, not oneself. Sign-in,
    /// sessions and the API key stop at once on every replica; the user's files and
    /// collections are the library's to remove (the store records the pending deletion).
    ///
    /// # Errors
    /// Oneself, the primary admin, no such user, or a store failure.
    pub async fn delete_user(&self, caller: &User, id: &str) -> Result<User, AuthError> {
        if caller.id == id {
            return Err(AuthError::Forbidden(
                "You cannot delete your own account: ask another admin",
            ));
        }
        if self.auth.meta.primary_admin().await?.as_deref() == Some(id) {
            return Err(AuthError::Forbidden(PRIMARY_ADMIN_PROTECTED));
        }
        let Some(user) = self.auth.meta.delete_user(id).await? else {
            return Err(AuthError::NotFound(crate::error::msg::NOT_FOUND.into()));
        };
        self.user_changed(id).await?;
        tracing::info!(admin = %caller.id, user = %user.id, "user deleted");
        Ok(user)
    }

    /// A user and their key, for the limits API.
    ///
    /// # Errors
    /// No such user, or the store failed.
    pub async fn limits_of(
        &self,
        user_id: &str,
    ) -> Result<(User, Option<ApiKeyRecord>), AuthError> {
        let user = self
            .auth
            .meta
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| AuthError::NotFound("No such user".into()))?;
        Ok((user, self.key_of(user_id).await?))
    }

    /// Sets a user's limits and/or their API key's (`Limits::default()` clears them); the
    /// new limits apply on every replica from the next request.
    ///
    /// # Errors
    /// No such user, no key to limit, or a store failure.
    pub async fn set_limits(
        &self,
        user_id: &str,
        user: Option<Limits>,
        key: Option<Limits>,
    ) -> Result<(), AuthError> {
        if self.auth.meta.user_by_id(user_id).await?.is_none() {
            return Err(AuthError::NotFound("No such user".into()));
        }
        if let Some(k) = key
            && self
                .auth
                .meta
                .set_api_key_limits(user_id, k)
                .await?
                .is_none()
        {
            return Err(AuthError::NotFound(
                "This user has no API key; its limits are set when one is created".into(),
            ));
        }
        if let Some(u) = user {
            match self
                .auth
                .meta
                .update_user(
                    user_id,
                    Box::new(move |usr| {
                        usr.limits = u;
                        Ok(())
                    }),
                )
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(refusal)) => return Err(AuthError::Invalid(refusal)),
                Err(StorageError::NoSuchUser) => {
                    return Err(AuthError::NotFound("No such user".into()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.user_changed(user_id).await
    }
}
