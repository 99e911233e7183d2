//! Who may read or write a file or a knowledge collection (Open WebUI's access grants).
//!
//! Owner and admin always may. Others need a grant with exactly that permission to
//! `user:<id>` or `user:*`. Group grants are stored but match nobody: ragway has no groups.

use crate::storage::{Metadata, StorageError};
use crate::store::{FileRecord, KnowledgeRecord, Role, User};

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
/// A storage failure is an error, not a "no": it must not pass for a missing file.
pub async fn can_read_file(
    meta: &dyn Metadata,
    user: &User,
    file: &FileRecord,
) -> Result<bool, StorageError> {
    if user.role == Role::Admin || file.user_id == user.id {
        return Ok(true);
    }
    for id in meta.file_knowledge(&file.id).await? {
        if meta
            .knowledge(&id)
            .await?
            .is_some_and(|kb| can_read_kb(user, &kb))
        {
            return Ok(true);
        }
    }
    Ok(false)
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
pub async fn can_add_file_to(
    meta: &dyn Metadata,
    user: &User,
    file: &FileRecord,
    kb: &KnowledgeRecord,
) -> Result<bool, StorageError> {
    if user.role == Role::Admin || file.user_id == user.id {
        return Ok(true);
    }
    Ok(meta
        .user_by_id(&file.user_id)
        .await?
        .is_some_and(|owner| can_write_kb(&owner, kb)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Grant, Store, StoreError};

    fn file(owner: &str) -> FileRecord {
        FileRecord {
            id: "f1".into(),
            user_id: owner.into(),
            filename: "a.txt".into(),
            path: "/nonexistent/a.txt".into(),
            hash: None,
            status: None,
            error: None,
            meta: serde_json::json!({}),
            embedding: None,
            chunk_count: 0,
            created_at: 1,
            updated_at: 1,
        }
    }

    fn shared_collection(owner: &str, reader: &str) -> KnowledgeRecord {
        KnowledgeRecord {
            id: "kb1".into(),
            user_id: owner.into(),
            name: "kb".into(),
            description: String::new(),
            meta: serde_json::json!({}),
            access_grants: vec![Grant {
                id: "g1".into(),
                principal_type: "user".into(),
                principal_id: reader.into(),
                permission: "read".into(),
                created_at: 1,
            }],
            created_at: 1,
            updated_at: 1,
        }
    }

    #[tokio::test]
    async fn a_failing_store_is_an_error_not_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&dir.path().join("t.redb")).unwrap());
        let index = std::sync::Arc::new(crate::storage::embedded::vectors::VectorStore::new(
            10_000,
            crate::index::GraphKind::Usearch,
            None,
        ));
        let seams =
            crate::storage::embedded::storage(store.clone(), index, dir.path().join("uploads"), 16);
        let meta = &*seams.meta;
        let owner = store
            .create_user(User::new("o@x.io", "O", Role::User, "h".into()), false)
            .unwrap();
        let reader = store
            .create_user(User::new("r@x.io", "R", Role::User, "h".into()), false)
            .unwrap();
        let stranger = store
            .create_user(User::new("s@x.io", "S", Role::User, "h".into()), false)
            .unwrap();
        let f = file(&owner.id);
        store.insert_file(&f, false).unwrap();
        store
            .put_knowledge(&shared_collection(&owner.id, &reader.id))
            .unwrap();
        store.link_file("kb1", "f1").unwrap();
        let kb = store.knowledge("kb1").unwrap().unwrap();
        // Working store: the grant lets the reader read the file; adding it to a collection
        // the owner can write is allowed; nobody else reads it.
        assert!(can_read_file(meta, &reader, &f).await.unwrap());
        assert!(!can_read_file(meta, &stranger, &f).await.unwrap());
        assert!(can_add_file_to(meta, &reader, &f, &kb).await.unwrap());

        store.release();
        assert!(matches!(
            can_read_file(meta, &reader, &f).await,
            Err(StorageError::Embedded(StoreError::Released))
        ));
        assert!(matches!(
            can_add_file_to(meta, &reader, &f, &kb).await,
            Err(StorageError::Embedded(StoreError::Released))
        ));
        // Owner and admin need no store read.
        assert!(can_read_file(meta, &owner, &f).await.unwrap());
    }
}
