-- Whether the client asked for SMTPUTF8 (RFC 6531) at MAIL FROM: the next hop must
-- offer it for a message that needs it, and the parameter is passed on.
ALTER TABLE outgoing ADD COLUMN smtputf8 BOOLEAN NOT NULL DEFAULT FALSE;
