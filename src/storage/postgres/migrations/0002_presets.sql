-- Model presets (Open WebUI's workspace models), one row per preset. The body is the
-- whole record; user_id is beside it because the per-user bound counts by owner.
CREATE TABLE presets (
    id text PRIMARY KEY,
    user_id text NOT NULL,
    body json NOT NULL
);
CREATE INDEX presets_user ON presets (user_id);
