#!/usr/bin/env python3
"""The email tests' hands on the loopback mail server (scripts/mail-env.sh): add users, send mail
over SMTP, read a mailbox over IMAPS, put raw messages straight into a mailbox (IMAP APPEND, so
malformed mail reaches it untouched), drop connections, reset a folder's UIDVALIDITY and restart
Dovecot. Prints JSON. The server's folder is $STELE_MAIL_BASE.

  mail_client.py adduser NAME
  mail_client.py send FROM TO SUBJECT BODY [--header 'Name: value']... [--id ID]
                      [--in-reply-to ID] [--references 'ID ID']
  mail_client.py fetch USER [FOLDER]
  mail_client.py append USER FILE...
  mail_client.py kick USER
  mail_client.py reset-uidvalidity USER
  mail_client.py restart
"""
import argparse, base64, email, email.policy, email.utils, imaplib, json, os, shutil, smtplib, ssl
import subprocess, sys, time

BASE = os.environ["STELE_MAIL_BASE"]
CONF = f"{BASE}/dovecot/dovecot.conf"
SMTP_PORT = int(os.environ.get("STELE_MAIL_SMTP_PORT", "11025"))
IMAPS_PORT = int(os.environ.get("STELE_MAIL_IMAPS_PORT", "11993"))


def retrying(what):
    """Runs `what`, again for a while when the server is restarting (another test may do it)."""
    deadline = time.time() + 30
    while True:
        try:
            return what()
        except (OSError, imaplib.IMAP4.error, smtplib.SMTPException):
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def imap(user):
    ctx = ssl.create_default_context(cafile=f"{BASE}/certs/ca.pem")
    m = imaplib.IMAP4_SSL("127.0.0.1", IMAPS_PORT, ssl_context=ctx)
    m.login(user, "secret")
    return m


def adduser(args):
    line = f"{args.name}:{{PLAIN}}secret::::::\n"
    with open(f"{BASE}/dovecot/users", "a") as users:
        users.write(line)
    # Dovecot looks at the file at most once a second: the user exists once it can log in.
    retrying(lambda: imap(args.name).logout())
    print(json.dumps({"user": args.name}))


def send(args):
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = args.sender
    msg["To"] = args.to
    msg["Subject"] = args.subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = args.id or email.utils.make_msgid(domain="client.test")
    if args.in_reply_to:
        msg["In-Reply-To"] = args.in_reply_to
    if args.references:
        msg["References"] = args.references
    for header in args.header or []:
        name, value = header.split(":", 1)
        msg[name.strip()] = value.strip()
    msg.set_content(args.body)
    for path in args.attach or []:
        with open(path, "rb") as f:
            msg.add_attachment(f.read(), maintype="application", subtype="octet-stream",
                               filename=os.path.basename(path))
    envelope_from = email.utils.parseaddr(args.sender)[1]

    def go():
        with smtplib.SMTP("127.0.0.1", SMTP_PORT) as s:
            s.sendmail(envelope_from, [email.utils.parseaddr(args.to)[1]], msg.as_bytes())

    retrying(go)
    print(json.dumps({"message_id": msg["Message-ID"]}))


def fetch(args):
    def go():
        m = imap(args.user)
        if m.select(args.folder, readonly=True)[0] != "OK":
            m.logout()
            return []  # no such folder (yet)
        out = []
        for num in m.search(None, "ALL")[1][0].split():
            # The body is the response's (envelope, bytes) part: an untagged FETCH of flags that
            # another session changed meanwhile (the node marking a mail seen) comes as plain
            # bytes in the same list; a mail moved away meanwhile has no body part.
            parts = m.fetch(num, "(BODY.PEEK[])")[1]
            raw = next((part[1] for part in parts if isinstance(part, tuple)), None)
            if raw is None:
                continue
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            text = msg.get_body(preferencelist=("plain",))
            html = msg.get_body(preferencelist=("html",))
            out.append({
                "message_id": msg["Message-ID"], "in_reply_to": msg["In-Reply-To"],
                "references": msg["References"], "subject": msg["Subject"], "from": msg["From"],
                "to": msg["To"], "auto_submitted": msg["Auto-Submitted"],
                "text": text.get_content() if text else "",
                "html": html.get_content() if html else "",
                "raw": base64.b64encode(raw).decode(),
            })
        m.logout()
        return out

    print(json.dumps(retrying(go)))


def append(args):
    def go():
        m = imap(args.user)
        for path in args.files:
            with open(path, "rb") as f:
                typ, data = m.append("INBOX", None, None, f.read())
                assert typ == "OK", (path, data)
        m.logout()

    retrying(go)
    print(json.dumps({"appended": len(args.files)}))


def drop_connections(user):
    subprocess.run(["doveadm", "-c", CONF, "kick", user], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kick(args):
    drop_connections(args.user)
    print(json.dumps({"kicked": args.user}))


def reset_uidvalidity(args):
    maildir = f"{BASE}/mail/{args.user}/Maildir"
    drop_connections(args.user)
    # Dovecot numbers a maildir's messages in dovecot-uidlist: without it, it numbers them again
    # under a new UIDVALIDITY, as after a restore.
    for name in os.listdir(maildir):
        if name.startswith("dovecot-uidlist") or name.startswith("dovecot.index"):
            os.remove(os.path.join(maildir, name))
    time.sleep(1.1)  # a new UIDVALIDITY is the time in seconds: make sure it differs
    drop_connections(args.user)
    m = retrying(lambda: imap(args.user))
    m.select("INBOX")
    validity = m.response("UIDVALIDITY")[1]
    m.logout()
    print(json.dumps({"uidvalidity": validity[0].decode() if validity and validity[0] else None}))


def restart(_args):
    subprocess.run(["doveadm", "-c", CONF, "stop"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if not os.path.exists(f"{BASE}/dovecot/run/master.pid"):
            break
        time.sleep(0.05)
    subprocess.run(["dovecot", "-c", CONF], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    retrying(lambda: imap("alice").logout())
    print(json.dumps({"restarted": True}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("adduser"); a.add_argument("name"); a.set_defaults(run=adduser)
    s = sub.add_parser("send")
    s.add_argument("sender"); s.add_argument("to"); s.add_argument("subject"); s.add_argument("body")
    s.add_argument("--header", action="append"); s.add_argument("--id")
    s.add_argument("--in-reply-to"); s.add_argument("--references")
    s.add_argument("--attach", action="append")
    s.set_defaults(run=send)
    f = sub.add_parser("fetch"); f.add_argument("user"); f.add_argument("folder", nargs="?", default="INBOX")
    f.set_defaults(run=fetch)
    ap = sub.add_parser("append"); ap.add_argument("user"); ap.add_argument("files", nargs="+")
    ap.set_defaults(run=append)
    k = sub.add_parser("kick"); k.add_argument("user"); k.set_defaults(run=kick)
    r = sub.add_parser("reset-uidvalidity"); r.add_argument("user"); r.set_defaults(run=reset_uidvalidity)
    rs = sub.add_parser("restart"); rs.set_defaults(run=restart)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
