-- Accounts, browser sign-in sessions, and preferences that belong to an
-- account (issue 15).

-- People who sign in. The password is kept only as an Argon2id PHC string
-- (algorithm, parameters, salt and hash in one value).
CREATE TABLE omni_accounts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text        NOT NULL UNIQUE,
    password_hash text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('admin', 'user')),
    disabled      boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);

-- Server-side sign-in sessions. The browser holds a random token in a cookie;
-- only its SHA-256 digest is stored, so a copy of this table signs no one in.
-- account_id is NULL for a session opened with the API key.
CREATE TABLE omni_auth_sessions (
    id            uuid        PRIMARY KEY,
    token_digest  bytea       NOT NULL UNIQUE,
    account_id    bigint      REFERENCES omni_accounts (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX omni_auth_sessions_account_idx ON omni_auth_sessions (account_id);

-- Preferences of an account: the same table, keyed by the account instead of
-- the anonymous x-session-id. Exactly one of the two owners is set.
ALTER TABLE omni_user_preferences ALTER COLUMN session_id DROP NOT NULL;
ALTER TABLE omni_user_preferences ADD COLUMN account_id bigint REFERENCES omni_accounts (id) ON DELETE CASCADE;
ALTER TABLE omni_user_preferences ADD CONSTRAINT omni_user_preferences_one_owner
    CHECK ((session_id IS NULL) <> (account_id IS NULL));
ALTER TABLE omni_user_preferences ADD CONSTRAINT omni_user_preferences_account_key UNIQUE (account_id, key);

-- Earlier UIs kept the API key itself as a preference so a tab stayed signed
-- in; anyone holding the session id could read it. Those rows go.
DELETE FROM omni_user_preferences WHERE lower(key) IN ('api_key', 'apikey', 'api-key', 'omni_api_key', 'omni.api_key', 'x-api-key');
