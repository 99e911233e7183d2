//! User administration: updates that keep the email index consistent, deletion with a
//! crash-safe record of what is left to clean up, and the primary admin.

use redb::ReadableTable;

use super::{
    API_KEYS, Result, Store, StoreError, USER_API_KEY, USER_DELETIONS, USER_EMAILS, USERS, decode,
    encode,
};
use crate::store::{Role, User, now_secs};

/// Settings key holding the id of the first admin (Open WebUI's "primary" admin).
pub const PRIMARY_ADMIN: &str = "primary_admin";

impl Store {
    /// Changes a user in one transaction (read, `change`, write), so two concurrent
    /// updates cannot lose each other's fields. A changed email moves in the uniqueness
    /// index; an email taken by someone else is [`StoreError::EmailTaken`].
    pub fn update_user<E>(
        &self,
        id: &str,
        change: impl FnOnce(&mut User) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<User, E>> {
        let txn = self.db.begin_write()?;
        let user = {
            let mut users = txn.open_table(USERS)?;
            let Some(old) = users.get(id)?.map(|v| v.value().to_string()) else {
                return Err(StoreError::NoSuchUser);
            };
            let old: User = decode("users", &old)?;
            let mut user = old.clone();
            if let Err(e) = change(&mut user) {
                return Ok(Err(e));
            }
            user.id.clone_from(&old.id);
            user.updated_at = now_secs();
            if user.email != old.email {
                let mut emails = txn.open_table(USER_EMAILS)?;
                if emails.get(user.email.as_str())?.is_some() {
                    return Err(StoreError::EmailTaken);
                }
                emails.remove(old.email.as_str())?;
                emails.insert(user.email.as_str(), user.id.as_str())?;
            }
            users.insert(id, encode(&user).as_str())?;
            user
        };
        txn.commit()?;
        Ok(Ok(user))
    }

    /// Removes a user, their email and their API key in one transaction, and records the
    /// deletion so their files and collections are removed even across a crash. Returns
    /// the removed user, or `None` when there was none.
    pub fn delete_user(&self, id: &str) -> Result<Option<User>> {
        let txn = self.db.begin_write()?;
        let user = {
            let Some(raw) = txn
                .open_table(USERS)?
                .remove(id)?
                .map(|g| g.value().to_string())
            else {
                return Ok(None);
            };
            let user: User = decode("users", &raw)?;
            txn.open_table(USER_EMAILS)?.remove(user.email.as_str())?;
            if let Some(hash) = txn
                .open_table(USER_API_KEY)?
                .remove(id)?
                .map(|g| g.value().to_string())
            {
                txn.open_table(API_KEYS)?.remove(hash.as_str())?;
            }
            txn.open_table(USER_DELETIONS)?.insert(id, now_secs())?;
            user
        };
        txn.commit()?;
        Ok(Some(user))
    }

    /// Deleted users whose data is not yet all removed.
    pub fn pending_user_deletions(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(USER_DELETIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(row?.0.value().to_string());
        }
        Ok(out)
    }

    /// Marks a deleted user's data as fully removed.
    pub fn finish_user_deletion(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(USER_DELETIONS)?.remove(id)?;
        txn.commit()?;
        Ok(())
    }

    /// The primary admin's id: the first user, recorded when they were created. Stores
    /// made before that record fall back to the earliest admin.
    pub fn primary_admin(&self) -> Result<Option<String>> {
        if let Some(id) = self.setting(PRIMARY_ADMIN)?
            && self.user_by_id(&id)?.is_some()
        {
            return Ok(Some(id));
        }
        Ok(self
            .users()?
            .into_iter()
            .filter(|u| u.role == Role::Admin)
            .min_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)))
            .map(|u| u.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("t.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn email_changes_move_the_index_and_collisions_are_refused() {
        let (_d, s) = store();
        let a = s
            .create_user(User::new("a@x.io", "A", Role::User, "h".into()), true)
            .unwrap();
        let b = s
            .create_user(User::new("b@x.io", "B", Role::User, "h".into()), true)
            .unwrap();
        assert_eq!(s.primary_admin().unwrap().as_deref(), Some(a.id.as_str()));
        let r = s.update_user(&b.id, |u| {
            u.email = "a@x.io".into();
            Ok::<(), ()>(())
        });
        assert!(matches!(r, Err(StoreError::EmailTaken)));
        let u = s
            .update_user(&b.id, |u| {
                u.email = "c@x.io".into();
                Ok::<(), ()>(())
            })
            .unwrap()
            .unwrap();
        assert_eq!(u.email, "c@x.io");
        assert!(s.user_by_email("b@x.io").unwrap().is_none());
        assert_eq!(s.user_by_email("c@x.io").unwrap().unwrap().id, b.id);
        // A refusal from the change itself writes nothing.
        let r = s
            .update_user(&b.id, |u| {
                u.name = "changed".into();
                Err("no")
            })
            .unwrap();
        assert_eq!(r.unwrap_err(), "no");
        assert_eq!(s.user_by_id(&b.id).unwrap().unwrap().name, "B");
    }

    #[test]
    fn primary_admin_falls_back_to_the_earliest_admin_without_a_record() {
        let (_d, s) = store();
        let mut old = User::new("old@x.io", "Old", Role::Admin, "h".into());
        old.created_at = 10;
        let mut new = User::new("new@x.io", "New", Role::Admin, "h".into());
        new.created_at = 20;
        let mut first_user = User::new("u@x.io", "U", Role::User, "h".into());
        first_user.created_at = 1;
        for u in [new, old.clone(), first_user] {
            // Not via the first-user path: a store made before the record existed.
            s.create_user(u, false).unwrap();
        }
        assert_eq!(s.primary_admin().unwrap(), Some(old.id.clone()));
        s.set_setting(PRIMARY_ADMIN, "gone").unwrap();
        assert_eq!(
            s.primary_admin().unwrap(),
            Some(old.id),
            "a stale record is ignored"
        );
    }

    #[test]
    fn deletion_removes_login_and_key_and_is_recorded_until_finished() {
        let (_d, s) = store();
        let u = s
            .create_user(User::new("a@x.io", "A", Role::User, "h".into()), false)
            .unwrap();
        let rec = crate::store::ApiKeyRecord {
            user_id: u.id.clone(),
            prefix: "sk-1".into(),
            created_at: 0,
            models: vec![],
            limits: crate::limits::Limits::default(),
        };
        s.put_api_key("h1", &rec).unwrap();
        assert!(s.delete_user(&u.id).unwrap().is_some());
        assert!(s.user_by_email("a@x.io").unwrap().is_none());
        assert!(s.api_key_by_hash("h1").unwrap().is_none());
        assert!(s.api_key_of_user(&u.id).unwrap().is_none());
        assert_eq!(s.pending_user_deletions().unwrap(), vec![u.id.clone()]);
        s.finish_user_deletion(&u.id).unwrap();
        assert!(s.pending_user_deletions().unwrap().is_empty());
        assert!(s.delete_user(&u.id).unwrap().is_none());
        // The email is free again.
        s.create_user(User::new("a@x.io", "A", Role::User, "h".into()), false)
            .unwrap();
    }
}
