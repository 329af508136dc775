-- The registry's shared state when several instances serve one URL (PostgreSQL).
-- Applied once, in file order, by registry.pgstore; schema_version records it.

CREATE TABLE records (
    node_id TEXT COLLATE "C" PRIMARY KEY,  -- byte order: search pages by node id
    seq BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    online BOOLEAN NOT NULL,
    subs TEXT NOT NULL,
    jur TEXT NOT NULL,
    lang TEXT NOT NULL,
    wire BYTEA NOT NULL,
    avail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX records_expiry ON records (expires_at);
CREATE INDEX records_avail ON records (avail);

-- Every relayed message passes through here: written before it is acknowledged,
-- deleted once written to its recipient's socket (at-least-once delivery).
CREATE TABLE mailbox (
    id BIGSERIAL PRIMARY KEY,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    data BYTEA NOT NULL,
    size INTEGER NOT NULL,
    origin TEXT NOT NULL DEFAULT ''
);
CREATE INDEX mailbox_by_recipient ON mailbox (recipient, sender, id);
CREATE INDEX mailbox_sender ON mailbox (sender);
CREATE INDEX mailbox_origin ON mailbox (origin);
CREATE INDEX mailbox_expiry ON mailbox (expires_at);

-- Token buckets shared by all instances (TURN credentials, publishing, new records).
CREATE TABLE rate_buckets (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX rate_buckets_updated ON rate_buckets (updated);

-- TURN credentials issued per node (accounting; the rate is in rate_buckets).
CREATE TABLE turn_issued (
    node_id TEXT PRIMARY KEY,
    issued BIGINT NOT NULL,
    last_at BIGINT NOT NULL
);

-- Live instances (heartbeat, database time) and which one holds each node's socket.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE presence (
    node_id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    since TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX presence_instance ON presence (instance);
