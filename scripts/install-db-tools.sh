#!/bin/sh
# Debian packages behind tests/dbservers.py: PostgreSQL (server and psql) and MariaDB (server and client);
# and the ODBC driver manager and MariaDB Connector/ODBC, which the runtime's mysql connector reads through.
# Idempotent: installs only what is missing, and runs `apt-get update` only then.
#
# The tests start their own throwaway servers from the packaged binaries, so the clusters the packages
# create and start (the `main` PostgreSQL cluster, the MariaDB datadir under /var/lib/mysql) are not used.
# Two things keep this working in a container without systemd or any init system:
#   - policy-rc.d answers 101 ("action forbidden") during the install, so the packages' postinst scripts
#     do not try to start services (and do not fail when invoke-rc.d has nothing to talk to);
#   - anything that started anyway is stopped afterwards, so no packaged server holds ports 5432/3306.
set -eu

export DEBIAN_FRONTEND=noninteractive

need=""
have_pkg() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
# The Debian paths themselves: /usr/local/bin may hold wrappers or other builds, which do not count.
have_pg() {
    for tool in "$@"; do
        ls /usr/lib/postgresql/*/bin/"$tool" >/dev/null 2>&1 || return 1
    done
}

have_pg initdb postgres || need="$need postgresql"
have_pg psql || need="$need postgresql-client"
{ [ -x /usr/sbin/mariadbd ] && [ -x /usr/bin/mariadb-install-db ] && have_pkg mariadb-server; } || \
    need="$need mariadb-server"
{ [ -x /usr/bin/mariadb ] && have_pkg mariadb-client; } || need="$need mariadb-client"
command -v psql >/dev/null 2>&1 || need="$need postgresql-client-common"
have_pkg unixodbc || need="$need unixodbc"
have_pkg odbc-mariadb || need="$need odbc-mariadb"

if [ -z "$need" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-db-tools: missing packages:$need (run as root, or install them yourself)" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
fi
cleanup() {
    if [ "$own_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
}
trap cleanup EXIT

echo "install-db-tools: installing$need" >&2
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null

# Stop whatever the packages managed to start; none of these is fatal when nothing is running.
if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r version cluster _port status _rest; do
        if [ "$status" = "online" ]; then
            pg_ctlcluster "$version" "$cluster" stop -m fast >/dev/null 2>&1 || true
        fi
    done
fi
if [ -S /run/mysqld/mysqld.sock ] && command -v mariadb-admin >/dev/null 2>&1; then
    mariadb-admin --socket=/run/mysqld/mysqld.sock shutdown >/dev/null 2>&1 || true
fi
exit 0
