-- Keep vectors in the row. A chunk row (a 384-dimension vector is 1.5 kB, plus its JSON body
-- and terms) is over the 2 kB TOAST threshold, and the default storage of `vector` moves the
-- vector out of line first: every vector an exact scan reads was then fetched from the TOAST
-- table (measured: RAG added latency +80 ms vs +35 ms with vectors in the row). MAIN moves the
-- other columns out first and the vector only as a last resort, so vectors of large models
-- (3,072 dimensions, 12 kB) are still stored. Rows written before stay as they are until their
-- file is processed again.
ALTER TABLE chunks ALTER COLUMN embedding SET STORAGE MAIN;
