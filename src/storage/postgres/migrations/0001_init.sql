-- ragway schema, version 1. Records are kept as `json` (not `jsonb`): the text is kept
-- byte for byte, so a record reads back exactly as the embedded store returns it. Columns
-- beside the body are only what queries filter, join or order on.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE users (
    id text PRIMARY KEY,
    email text NOT NULL UNIQUE,
    body json NOT NULL,
    created_at bigint NOT NULL
);

CREATE TABLE settings (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- One key per user (Open WebUI's rule); the plaintext key is never stored.
CREATE TABLE api_keys (
    hash text PRIMARY KEY,
    user_id text NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    body json NOT NULL
);

-- Signed-out JWT ids; expires_at 0 = never.
CREATE TABLE revoked_tokens (
    jti text PRIMARY KEY,
    expires_at bigint NOT NULL
);

-- Deleted users whose files and collections are not all removed yet.
CREATE TABLE user_deletions (
    id text PRIMARY KEY,
    deleted_at bigint NOT NULL
);

CREATE TABLE files (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    body json NOT NULL,
    content text,
    created_at bigint NOT NULL
);
CREATE INDEX files_user ON files (user_id);

CREATE TABLE knowledge (
    id text PRIMARY KEY,
    body json NOT NULL,
    created_at bigint NOT NULL
);

-- No foreign key to knowledge: as in the embedded store, memberships are removed with the
-- collection explicitly.
CREATE TABLE knowledge_files (
    knowledge_id text NOT NULL,
    file_id text NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    PRIMARY KEY (knowledge_id, file_id)
);
CREATE INDEX knowledge_files_file ON knowledge_files (file_id);

-- embedding has no fixed dimension, so files embedded by different models can coexist;
-- the HNSW index is an expression index per dimension (created when a dimension is first
-- stored, see `ensure_hnsw`).
CREATE TABLE chunks (
    id bigserial PRIMARY KEY,
    file_id text NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    body json NOT NULL,
    embedding vector NOT NULL,
    tsv tsvector NOT NULL
);
CREATE INDEX chunks_file ON chunks (file_id, idx);
CREATE INDEX chunks_tsv ON chunks USING gin (tsv);

-- The work queue: a row per queued file; a live lease is (token, lease_until > now).
CREATE TABLE jobs (
    file_id text PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    seq bigserial NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    token text,
    lease_until timestamptz
);
CREATE INDEX jobs_seq ON jobs (seq);

CREATE TABLE counters (
    key text PRIMARY KEY,
    count bigint NOT NULL,
    window_end timestamptz NOT NULL
);

CREATE TABLE blobs (
    key text PRIMARY KEY,
    data bytea NOT NULL
);

CREATE TABLE usage (
    hour bigint NOT NULL,
    user_id text NOT NULL,
    key_prefix text NOT NULL,
    model text NOT NULL,
    requests bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    PRIMARY KEY (hour, user_id, key_prefix, model)
);
