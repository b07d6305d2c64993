#!/usr/bin/env bash
# scripts/mail-env.sh — a mail server on loopback for the email tests: Dovecot (IMAP with IDLE,
# IMAPS, LMTP) and Postfix (SMTP with STARTTLS and AUTH, SMTPS), every recipient delivered by
# Postfix to Dovecot over LMTP. Debian 12; must run as root (Postfix's master and Dovecot's
# per-user mail uid need it).
#
#   bash scripts/mail-env.sh up      # install the packages if missing, write certs and configs
#                                    # under $STELE_MAIL_BASE, start both (idempotent: a running
#                                    # server is left as it is)
#   bash scripts/mail-env.sh down    # stop both
#   bash scripts/mail-env.sh status
#
# Users: any line `name:{PLAIN}secret::::::` in $STELE_MAIL_BASE/dovecot/users (Dovecot re-reads
# the file when it changes, so a test adds its own users); `alice` and `bob` (password `secret`)
# are there from the start. Any domain reaches the same user (`alice@localhost`,
# `alice@example.com`). Unknown users are refused by LMTP (550), so Postfix bounces the mail.
# Clients trust $STELE_MAIL_BASE/certs/ca.pem (the server's certificate names localhost,
# 127.0.0.1, 127.0.0.2 and ::1). On 127.0.0.2 Dovecot does not offer IDLE (clients must poll).
# SpamAssassin's spamd answers on 127.0.0.1:11783 (its shipped rules, no network checks).
set -euo pipefail
BASE=${STELE_MAIL_BASE:-/var/cache/stele/mail}
IMAP_PORT=${STELE_MAIL_IMAP_PORT:-11143}
IMAPS_PORT=${STELE_MAIL_IMAPS_PORT:-11993}
LMTP_PORT=${STELE_MAIL_LMTP_PORT:-11024}
SMTP_PORT=${STELE_MAIL_SMTP_PORT:-11025}
SMTPS_PORT=${STELE_MAIL_SMTPS_PORT:-11465}
SPAMD_PORT=${STELE_MAIL_SPAMD_PORT:-11783}
MAIL_UID=${STELE_MAIL_UID:-5000}
# Bumped whenever the certificates or configuration change: a server set up by an older version
# is stopped and set up again.
VERSION=4

log() { printf 'mail-env: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 60 s (spamd compiles its rules first).
wait_port() {
    local _
    for _ in $(seq 1 1200); do
        port_open "$1" && return 0
        sleep 0.05
    done
    log "port $1 did not open"
    return 1
}

install_packages() {
    local need=()
    command -v dovecot >/dev/null || need+=(dovecot-imapd dovecot-lmtpd)
    command -v postfix >/dev/null || need+=(postfix)
    [[ -x /usr/sbin/spamd ]] || need+=(spamd)
    command -v openssl >/dev/null || need+=(openssl)
    ((${#need[@]})) || return 0
    log "installing ${need[*]} (Debian)"
    # "No configuration": no /etc/postfix/main.cf is written and nothing starts on its own.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
}

certificates() {
    mkdir -p "$BASE/certs"
    [[ -s $BASE/certs/server.pem && $(cat "$BASE/certs/version" 2>/dev/null) == "$VERSION" ]] &&
        return 0
    (
        cd "$BASE/certs"
        # A small CA and a leaf that is not a CA: webpki refuses a self-signed CA certificate
        # presented as the server's own.
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=stele test mail CA" \
            -keyout ca.key -out ca.pem -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key \
            -out server.csr 2>/dev/null
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2,IP:::1" >leaf.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile leaf.ext -out server.pem 2>/dev/null
        rm -f server.csr leaf.ext ca.srl
        chmod 600 ca.key server.key
        chmod 644 ca.pem server.pem
        echo "$VERSION" >version
    )
}

dovecot_config() {
    mkdir -p "$BASE/dovecot" "$BASE/mail"
    chown "$MAIL_UID:$MAIL_UID" "$BASE/mail"
    # The empty fields are needed: the same file is the user database.
    [[ -s $BASE/dovecot/users ]] ||
        printf '%s\n' 'alice:{PLAIN}secret::::::' 'bob:{PLAIN}secret::::::' >"$BASE/dovecot/users"
    chmod 666 "$BASE/dovecot/users"
    cat >"$BASE/dovecot/dovecot.conf" <<EOF
instance_name = stele-test-mail
base_dir = $BASE/dovecot/run
state_dir = $BASE/dovecot/state
log_path = $BASE/dovecot/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1, 127.0.0.2, ::1
ssl = yes
ssl_cert = <$BASE/certs/server.pem
ssl_key = <$BASE/certs/server.key
ssl_dh = </usr/share/dovecot/dh.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Ln
passdb {
  driver = passwd-file
  args = scheme=PLAIN $BASE/dovecot/users
}
userdb {
  driver = passwd-file
  args = $BASE/dovecot/users
  default_fields = uid=$MAIL_UID gid=$MAIL_UID home=$BASE/mail/%n
}
first_valid_uid = $MAIL_UID
mail_location = maildir:~/Maildir
mail_max_userip_connections = 200
service imap-login {
  inet_listener imap {
    port = $IMAP_PORT
  }
  inet_listener imaps {
    port = $IMAPS_PORT
    ssl = yes
  }
  process_limit = 500
}
service imap {
  process_limit = 500
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $LMTP_PORT
  }
}
protocol lmtp {
  postmaster_address = postmaster@localhost
}
service auth {
  unix_listener auth-client {
    mode = 0666
  }
}
# A server without IDLE, for clients' polling.
local 127.0.0.2 {
  protocol imap {
    imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ UIDPLUS MOVE
  }
}
EOF
}

postfix_config() {
    mkdir -p "$BASE/postfix/etc" "$BASE/postfix/spool" "$BASE/postfix/data"
    chown postfix "$BASE/postfix/data"
    cat >"$BASE/postfix/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $BASE/postfix/spool
data_directory = $BASE/postfix/data
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = $BASE/postfix/postfix.log
maillog_file_prefixes = /var, /dev/stdout, $BASE
myhostname = localhost.localdomain
mydomain = localdomain
myorigin = localhost
inet_interfaces = loopback-only
inet_protocols = all
mynetworks = 127.0.0.0/8 [::1]/128
biff = no
smtputf8_enable = no
mydestination = localhost, localhost.localdomain
local_recipient_maps =
alias_maps =
alias_database =
local_transport = lmtp:inet:127.0.0.1:$LMTP_PORT
default_transport = lmtp:inet:127.0.0.1:$LMTP_PORT
relay_transport = lmtp:inet:127.0.0.1:$LMTP_PORT
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_tls_cert_file = $BASE/certs/server.pem
smtpd_tls_key_file = $BASE/certs/server.key
smtpd_tls_security_level = may
lmtp_tls_security_level = none
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = $BASE/dovecot/run/auth-client
smtpd_tls_auth_only = no
message_size_limit = 52428800
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
smtpd_client_connection_count_limit = 500
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
EOF
    cat >"$BASE/postfix/etc/master.cf" <<EOF
127.0.0.1:$SMTP_PORT  inet  n - n - - smtpd
[::1]:$SMTP_PORT      inet  n - n - - smtpd
127.0.0.1:$SMTPS_PORT inet  n - n - - smtpd -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
lmtp       unix  - - n -     - lmtp
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
EOF
}

running() {
    port_open "$IMAP_PORT" && port_open "$IMAPS_PORT" && port_open "$LMTP_PORT" &&
        port_open "$SMTP_PORT" && port_open "$SMTPS_PORT" && port_open "$SPAMD_PORT"
}

up() {
    [[ $(id -u) == 0 ]] || {
        log "must run as root (Postfix and Dovecot switch users)"
        return 1
    }
    local version
    version=$(cat "$BASE/version" 2>/dev/null || true)
    if running && [[ -s $BASE/certs/ca.pem && $version == "$VERSION" ]]; then
        log "dovecot and postfix answer on 127.0.0.1:$IMAP_PORT/$IMAPS_PORT/$SMTP_PORT/$SMTPS_PORT"
        return 0
    fi
    if running || port_open "$IMAP_PORT" || port_open "$SMTP_PORT"; then
        log "stopping a server set up by an older version of this script"
        down
        local _
        for _ in $(seq 1 200); do
            port_open "$IMAP_PORT" || port_open "$SMTP_PORT" || break
            sleep 0.05
        done
    fi
    install_packages
    mkdir -p "$BASE"
    chmod 755 "$BASE" # Postfix and the mail uid must reach the folders below
    certificates
    dovecot_config
    postfix_config
    # The daemons must not keep our stdout: a caller reading it would never see its end.
    port_open "$IMAP_PORT" || dovecot -c "$BASE/dovecot/dovecot.conf" </dev/null >>"$BASE/dovecot/startup.log" 2>&1
    if ! port_open "$SMTP_PORT"; then
        postfix -c "$BASE/postfix/etc" check
        postfix -c "$BASE/postfix/etc" start </dev/null >>"$BASE/postfix/startup.log" 2>&1
    fi
    if ! port_open "$SPAMD_PORT"; then
        # Local tests only: no network lookups (-L), no learning database to keep.
        /usr/sbin/spamd --listen="127.0.0.1:$SPAMD_PORT" --allowed-ips=127.0.0.1 -L \
            -u debian-spamd -d --pidfile="$BASE/spamd.pid" -s "$BASE/spamd.log" \
            </dev/null >>"$BASE/spamd-startup.log" 2>&1
    fi
    local port
    for port in "$IMAP_PORT" "$IMAPS_PORT" "$LMTP_PORT" "$SMTP_PORT" "$SMTPS_PORT" "$SPAMD_PORT"; do
        wait_port "$port"
    done
    echo "$VERSION" >"$BASE/version"
    log "dovecot, postfix and spamd started (IMAP $IMAP_PORT, IMAPS $IMAPS_PORT, SMTP $SMTP_PORT, SMTPS $SMTPS_PORT, spamd $SPAMD_PORT)"
}

down() {
    postfix -c "$BASE/postfix/etc" stop 2>/dev/null || true
    [[ -s $BASE/dovecot/run/master.pid ]] && doveadm -c "$BASE/dovecot/dovecot.conf" stop 2>/dev/null || true
    [[ -s $BASE/spamd.pid ]] && kill "$(cat "$BASE/spamd.pid")" 2>/dev/null || true
}

status() {
    if running; then echo "mail server up"; else echo "mail server down"; fi
}

"${1:-up}"
