-- The generated API key is kept only as its SHA-256 digest (hex), like a
-- password is kept only as a hash: a backup or a replica of this table no
-- longer holds a key that opens the API. The key is 256 random bits, so a
-- fast digest is as good as a slow one here. An operator-given OMNI_API_KEY
-- was never stored.
UPDATE omni_settings
SET value = jsonb_build_object('sha256', encode(sha256(convert_to(value #>> '{}', 'UTF8')), 'hex')),
    updated_at = now()
WHERE key = 'api_key' AND jsonb_typeof(value) = 'string';
