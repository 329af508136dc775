-- Open TCP sockets per client address on each instance, so the per-address socket
-- cap holds across instances. Rows of an instance whose heartbeat stopped do not
-- count, and are deleted with it.
CREATE TABLE address_sockets (
    instance TEXT NOT NULL,
    address TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (instance, address)
);
CREATE INDEX address_sockets_address ON address_sockets (address);
