-- ragway schema, version 6 (migrate slice): BM25 statistics in tables, so lexical search
-- on PostgreSQL ranks as the embedded backend does (same terms, same formula) instead of
-- by ts_rank_cd, which lost up to several points of nDCG@10 against it.
--
-- term_len: the chunk's length in terms (NULL until its terms are indexed: chunks stored
-- before this migration are indexed by ragway at connect, see `backfill_terms`).
ALTER TABLE chunks ADD COLUMN term_len integer;

-- One row per (term, chunk): the term's frequency in the chunk. Terms are ragway's own
-- (lowercased, English stop words removed, stemmed: `rag::bm25::terms`).
CREATE TABLE chunk_terms (
    term text NOT NULL,
    chunk_id bigint NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    tf integer NOT NULL,
    PRIMARY KEY (term, chunk_id)
);
-- For the cascade when a chunk goes.
CREATE INDEX chunk_terms_chunk ON chunk_terms (chunk_id);
CREATE INDEX chunks_unindexed ON chunks (id) WHERE term_len IS NULL;
