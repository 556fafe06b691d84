-- Per-browser-session preferences (SPEC §6). The session id comes from the
-- x-session-id header; the unique pair lets upserts use ON CONFLICT.
CREATE TABLE omni_user_preferences (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  uuid        NOT NULL,
    key         text        NOT NULL,
    value       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT omni_user_preferences_session_key UNIQUE (session_id, key)
);

-- Worker-wide settings: the generated API key, setup state, storage settings.
CREATE TABLE omni_settings (
    key         text        PRIMARY KEY,
    value       jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
