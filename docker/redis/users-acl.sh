#!/usr/bin/env bash
# The compose Redis's ACL file, rendered at each start from the one definition of the users
# (contracts/redis_users.acl, which the local stack reads too: ops/stack/redis_acl.py) and the
# passwords in the environment (WTC_REDIS_<USER>_PASSWORD).
#
#   users-acl.sh USERS_FILE OUT
#
# Nobody logs in as `default`: no password and no nopass (it keeps its rights because Redis
# replays the AOF as `default` and re-checks them at each EXEC: ops/stack/redis_acl.py,
# DEFAULT_USER); a user whose password is unset is off (nobody logs in as it); a user with a
# password is on with the password's SHA-256, never the password. OUT is written 0600. With
# WTC_ENV=production a development default password (dev-*) is refused, naming the variable.
set -euo pipefail

users_file=$1
out=$2
umask 077
tmp="$out.tmp"
printf 'user default on resetpass ~* &* +@all\n' > "$tmp"
while read -r word name rules; do
    [[ -z "$word" || "$word" == \#* ]] && continue
    if [[ "$word" != user || -z "$name" || "$name" == default ]]; then
        echo "users-acl.sh: $users_file: expected 'user <name> <rules>', got: $word $name" >&2
        exit 1
    fi
    variable="WTC_REDIS_${name^^}_PASSWORD"
    secret="${!variable:-}"
    if [[ -z "$secret" ]]; then
        login=off
    else
        if [[ "${WTC_ENV:-development}" == production && "$secret" == dev-* ]]; then
            echo "WTC_ENV=production and $variable is a development default: set it" >&2
            exit 1
        fi
        login="on #$(printf '%s' "$secret" | sha256sum | cut -d' ' -f1)"
    fi
    printf 'user %s %s resetchannels %s\n' "$name" "$login" "$rules" >> "$tmp"
done < "$users_file"
mv "$tmp" "$out"
