-- IMAP flags of a mailbox message (`\Seen \Answered $Label`), space-separated; NULL when
-- it has none. Imported ErlMail messages keep theirs; new mail starts without.
ALTER TABLE messages ADD COLUMN flags TEXT;
