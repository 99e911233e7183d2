//! Who may read or write a file or a knowledge collection (Open WebUI's access grants).
//!
//! Owner and admin always may. Others need a grant with exactly that permission to
//! `user:<id>` or `user:*`. Group grants are stored but match nobody: ragway has no groups.

use crate::store::{FileRecord, KnowledgeRecord, Role, Store, User};

fn granted(kb: &KnowledgeRecord, user: &User, permission: &str) -> bool {
    kb.access_grants.iter().any(|g| {
        g.permission == permission
            && g.principal_type == "user"
            && (g.principal_id == "*" || g.principal_id == user.id)
    })
}

pub fn can_read_kb(user: &User, kb: &KnowledgeRecord) -> bool {
    user.role == Role::Admin || kb.user_id == user.id || granted(kb, user, "read")
}

pub fn can_write_kb(user: &User, kb: &KnowledgeRecord) -> bool {
    user.role == Role::Admin || kb.user_id == user.id || granted(kb, user, "write")
}

/// A file is readable by its owner, an admin, or through a collection the user can read.
pub fn can_read_file(store: &Store, user: &User, file: &FileRecord) -> bool {
    user.role == Role::Admin
        || file.user_id == user.id
        || via_collections(store, user, file, can_read_kb)
}

/// Deleting or changing a file needs ownership or admin. A write grant on a collection that
/// holds the file is not enough: collections may hold other users' files, and a grantee
/// must not be able to destroy (or re-share) what they were only allowed to use.
pub fn can_write_file(user: &User, file: &FileRecord) -> bool {
    user.role == Role::Admin || file.user_id == user.id
}

/// Putting `file` into collection `kb` needs the file owner's consent: the caller owns the
/// file or is an admin, or the file's owner can write that collection themselves (so a
/// reader cannot move the owner's file into a collection of their own choosing).
pub fn can_add_file_to(
    store: &Store,
    user: &User,
    file: &FileRecord,
    kb: &KnowledgeRecord,
) -> bool {
    if user.role == Role::Admin || file.user_id == user.id {
        return true;
    }
    match store.user_by_id(&file.user_id) {
        Ok(Some(owner)) => can_write_kb(&owner, kb),
        _ => false,
    }
}

/// Whether `grants` may be set by `user` on a collection owned by `owner_id`: only the
/// owner or an admin changes who can see a collection, and only an admin makes one public
/// (`user:*`).
pub fn may_set_grants(
    user: &User,
    owner_id: &str,
    grants: &[crate::store::Grant],
) -> Result<(), &'static str> {
    if user.role == Role::Admin {
        return Ok(());
    }
    if user.id != owner_id {
        return Err("Only the owner of a collection or an admin can change its access grants");
    }
    if grants.iter().any(|g| g.principal_id == "*") {
        return Err("Only an admin can share a collection with everyone (user:*)");
    }
    Ok(())
}

fn via_collections(
    store: &Store,
    user: &User,
    file: &FileRecord,
    check: fn(&User, &KnowledgeRecord) -> bool,
) -> bool {
    store
        .file_knowledge(&file.id)
        .unwrap_or_default()
        .iter()
        .filter_map(|kb| store.knowledge(kb).ok().flatten())
        .any(|kb| check(user, &kb))
}
