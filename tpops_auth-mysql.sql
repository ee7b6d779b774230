-- Tables for tpops with $auth_type = 'MySQL'.
--
-- Load into an empty database:
--     mysqladmin create tpops
--     mysql tpops < tpops_auth-mysql.sql
--
-- Compatible with TPOPS 0.5's schema (same tables, columns and meanings), with
-- room for modern password hashes and long logins and paths, in utf8mb4. A
-- database made with the old schema keeps working unchanged.
--
-- user.passwd holds clear text (as TPOPS 0.5 did; APOP needs it) or, better, a
-- hash: '{SHA512-CRYPT}$6$...', '{BLF-CRYPT}$2y$...', '{ARGON2ID}$argon2id$...',
-- a bare crypt hash ('$6$...', '$2b$...'), or '{PLAIN}secret' for an APOP user
-- (e.g. made with: doveadm pw -s SHA512-CRYPT).
--
-- user.uid is a row id, not a system uid: tpops serves the Maildir as its owner
-- (or as --user/--group).

create table user (
    uid int not null auto_increment,    -- row id (TPOPS 0.5 name), not a system uid
    login varchar(255) not null,        -- POP3 login name
    passwd varchar(255) not null,       -- clear text or {SCHEME}hash / crypt hash
    mail varchar(255) not null,         -- mail address (not used by tpops)
    maildir varchar(255) not null,      -- absolute path of the Maildir
    quota int not null default 0,       -- not used by tpops
    primary key (uid),
    unique (login),
    unique (mail)
) default charset = utf8mb4;

-- Unused by tpops: TPOPS 0.5 kept its mailbox locks here. tpops uses GET_LOCK()
-- instead, which the server releases by itself when a tpops worker dies. Kept so
-- that tools written for the old schema still find it.
create table locks (
    uid int not null,
    pid int not null,
    host char(64) not null,
    timestamp timestamp not null,
    unique (uid),
    index (host)
) default charset = utf8mb4;
