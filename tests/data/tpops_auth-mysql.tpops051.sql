-- The MySQL schema of TPOPS 0.5.1 (2003), as its tpops_auth-mysql.sql made it: a test fixture.
--
-- Load it the way a 2003 administrator did, `mysql DB < this file`, into a latin1
-- database. The columns, their types and the keys are those of TPOPS 0.5.1: char(16)
-- logins and clear-text passwords, char(64) mail and maildir, a quota nobody read, and
-- the locks table TPOPS kept its session locks in (tpops uses GET_LOCK instead and
-- leaves the table alone).

create table user (
    uid int not null auto_increment,
    login char(16) not null,
    passwd char(16) not null,
    mail char(64) not null,
    maildir char(64) not null,
    quota int not null,
    primary key (uid),
    unique (login),
    unique (mail)
);

create table locks (
    uid int not null,
    pid int not null,
    host char(32) not null,
    timestamp timestamp not null,
    unique (uid),
    index (host)
);

-- Rows as TPOPS stored them: the password in clear text, the Maildir with and without
-- the trailing slash, a quote of each kind in the data.
insert into user (login, passwd, mail, maildir, quota) values
    ('tommy', 'tanstaaf', 'tommy@example.jp', '/home/tommy/Maildir/', 0),
    ('o''brien', 'quote"pw', 'obrien@example.jp', '/home/obrien/Maildir', 0);
