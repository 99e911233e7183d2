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

/// Deleting a file needs ownership, admin, or write access to a collection holding it.
pub fn can_write_file(store: &Store, user: &User, file: &FileRecord) -> bool {
    user.role == Role::Admin
        || file.user_id == user.id
        || via_collections(store, user, file, can_write_kb)
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
