-- ragway schema, version 7: per-key and per-user rate limits shared by every replica.
--
-- One row per bucket: (user, the user's API key or the user, kind). `used` is how much of the
-- limit was used at `at` (0 = a full bucket); a bucket refills continuously at limit/window
-- per second, computed when read (`ragway_rate_state`), so nothing runs to refill it.
-- `full_at` is when the bucket is full again at the rate that wrote it: rows past it carry
-- nothing and are deleted (ragway sweeps them every so many admissions), so the table holds
-- the buckets used within the last window (a day at most), not every user ever seen.
--
-- kind: 0 rpm, 1 tpm, 2 rpd, 3 tpd (`limits::Kind::code`).
CREATE TABLE rate_limits (
    user_id text NOT NULL,
    is_key boolean NOT NULL,
    kind smallint NOT NULL,
    used float8 NOT NULL,
    at timestamptz NOT NULL,
    full_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, is_key, kind)
);
CREATE INDEX rate_limits_full_at ON rate_limits (full_at);

-- The buckets a request draws on (one array element each), refilled to `p_at` at the
-- limits the request carries (as the embedded limiter does: limits changed since apply from
-- now on). A bucket without a row is full.
CREATE FUNCTION ragway_rate_state(
    p_user text, p_key boolean[], p_kind smallint[], p_limit float8[], p_window float8[],
    p_tokens boolean[], p_at timestamptz)
RETURNS TABLE (s_key boolean, s_kind smallint, s_limit float8, s_window float8,
               s_tokens boolean, s_used float8)
LANGUAGE sql STABLE AS $$
    SELECT r.k, r.kind, r.lim, r.win, r.tok,
           COALESCE(GREATEST(0::float8,
               b.used - GREATEST(EXTRACT(EPOCH FROM (p_at - b.at))::float8, 0) * r.lim / r.win),
               0)
    FROM unnest(p_key, p_kind, p_limit, p_window, p_tokens) AS r(k, kind, lim, win, tok)
    LEFT JOIN rate_limits b ON b.user_id = p_user AND b.is_key = r.k AND b.kind = r.kind
$$;

-- Admits one request or refuses it, atomically across replicas: every writer of a user's
-- buckets holds the transaction-level advisory lock on (namespace 'rate', hash of the user
-- id) while it reads and writes them, so two admissions never both take the last slot.
-- (A hash collision only makes two users wait for each other.) Returns the buckets that
-- refuse (nothing counted then), or no row when the request buckets were counted.
-- The refusal rule is `limits::refuses`: a request needs one whole request of room, tokens
-- a bucket not yet exhausted.
CREATE FUNCTION ragway_rate_admit(
    p_user text, p_key boolean[], p_kind smallint[], p_limit float8[], p_window float8[],
    p_tokens boolean[])
RETURNS TABLE (r_key boolean, r_kind smallint, r_used float8)
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(1918989413, hashtext(p_user));
    -- Read after the lock: this statement's snapshot sees the last holder's writes.
    t := clock_timestamp();
    RETURN QUERY
        SELECT s.s_key, s.s_kind, s.s_used
        FROM ragway_rate_state(p_user, p_key, p_kind, p_limit, p_window, p_tokens, t) s
        WHERE CASE WHEN s.s_tokens THEN s.s_used >= s.s_limit
                   ELSE s.s_used + 1 > s.s_limit END;
    IF FOUND THEN
        RETURN;
    END IF;
    INSERT INTO rate_limits AS b (user_id, is_key, kind, used, at, full_at)
        SELECT p_user, s.s_key, s.s_kind, s.s_used + 1, t,
               t + make_interval(secs => (s.s_used + 1) * s.s_window / s.s_limit)
        FROM ragway_rate_state(p_user, p_key, p_kind, p_limit, p_window, p_tokens, t) s
        WHERE NOT s.s_tokens
    ON CONFLICT (user_id, is_key, kind) DO UPDATE
        SET used = EXCLUDED.used, at = EXCLUDED.at, full_at = EXCLUDED.full_at;
END
$$;

-- Charges `p_amount` tokens to the token buckets given, under the same lock; the debt is
-- capped at one window (used at most twice the limit).
CREATE FUNCTION ragway_rate_charge(
    p_user text, p_key boolean[], p_kind smallint[], p_limit float8[], p_window float8[],
    p_tokens boolean[], p_amount float8)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(1918989413, hashtext(p_user));
    t := clock_timestamp();
    INSERT INTO rate_limits AS b (user_id, is_key, kind, used, at, full_at)
        SELECT p_user, s.s_key, s.s_kind, c.used, t,
               t + make_interval(secs => c.used * s.s_window / s.s_limit)
        FROM ragway_rate_state(p_user, p_key, p_kind, p_limit, p_window, p_tokens, t) s,
             LATERAL (SELECT LEAST(s.s_used + p_amount, 2 * s.s_limit) AS used) c
        WHERE s.s_tokens
    ON CONFLICT (user_id, is_key, kind) DO UPDATE
        SET used = EXCLUDED.used, at = EXCLUDED.at, full_at = EXCLUDED.full_at;
END
$$;
