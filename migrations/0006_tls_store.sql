-- The certificates several gateways on one database share
-- (OMNI_TLS_DOMAINS with an external DATABASE_URL; gateway/src/tls/shared.rs).
-- One gateway at a time orders from the ACME authority: it claims the
-- certificate's row (`claimed_by` until `claimed_until`), and the others
-- load what it writes when `NOTIFY omni_tls` names the row. The claim is a
-- row rather than an advisory lock for the reason omni_leader_lease is (0005):
-- it survives a failover, and a gateway that died holding it is replaced
-- once it expires.
--
-- Private keys are sealed by the gateways (ChaCha20-Poly1305, a key derived
-- from OMNI_TLS_SECRET_FILE) before they are written here.
CREATE TABLE omni_tls_account (
    -- The ACME directory URL: an account exists at one authority.
    directory text PRIMARY KEY,
    -- instant-acme's AccountCredentials (JSON, with the account key), sealed.
    credentials_sealed bytea NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE omni_tls_certificate (
    -- OMNI_TLS_DOMAINS as ordered: comma-separated, lower case.
    domains text PRIMARY KEY,
    -- PEM, leaf first; NULL until the first certificate is obtained.
    chain_pem text,
    key_sealed bytea,
    not_after timestamptz,
    obtained_by text,
    obtained_at timestamptz,
    -- The gateway ordering now, and until when its claim holds.
    claimed_by text,
    claimed_until timestamptz
);

-- HTTP-01 answers: any gateway's plain port answers the authority's check,
-- whichever gateway asked (a load balancer picks one).
CREATE TABLE omni_tls_challenge (
    token text PRIMARY KEY,
    key_authorization text NOT NULL,
    expires_at timestamptz NOT NULL
);
