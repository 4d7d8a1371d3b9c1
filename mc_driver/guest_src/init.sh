#!/bin/sh
# /init of the hybridft test guest (busybox sh, PID 1).  Built into the initramfs by mc_driver/guest/image.py.
#
# Kernel command line (read from /proc/cmdline; see mc_driver.guest.qemu_args.guest_cmdline):
#   hft.ip=ADDR/PREFIX   eth0 address (default 10.77.0.2/24)
#   hft.gw=ADDR          default route (optional)
#   hft.services=LIST    comma list of services to start (default echod,rrserver,httpd,blobd,tokend;
#                        "none")
#   hft.run=PROG,ARG,..  extra workload started at boot (commas become spaces); may repeat
#   hft.ipv6=1           keep IPv6 on (default off: router solicitations and MLD reports are spontaneous,
#                        timing-dependent guest output that would only add noise to COLO comparison)
#
# Console: ttyS0 gets kernel messages and the readiness line "HYBRIDFT-GUEST-READY ip=... services=...",
# or "HYBRIDFT-GUEST-FAILED <reasons>" when a module, the address, the route or a service failed.
# Control: ttyS1 runs a line-oriented command loop, off the guest network so it never perturbs the
# packets COLO compares.  Every reply ends with a line "HFT-END <rc>".  Commands:
#   ping [TOKEN]          -> "PONG [TOKEN]"              (the host uses a fresh token to resynchronise)
#   run PROG [ARGS...]    -> "PID <pid>"  PROG runs in the background, output in /tmp/PROG.<pid>.log
#   sh COMMAND...         -> COMMAND's output             run in the foreground by sh -c (trailing
#                                                        newlines dropped, one added)
#   kill PID [SIGNAL]     -> nothing                     rc is kill's
#   jobs                  -> "<pid> <state> <cmd>" lines for every "run" job
#   start SERVICE         -> "PID <pid>"                 once it listens (already running: its pid)
#   stop SERVICE          -> "STOPPED SERVICE"           once its port refuses connections; its open
#                                                        connections end too (not running: the same)
#   services              -> "<name> <port> running <pid>" or "<name> <port> stopped", every service
# Services (name: TCP port): echod 7, rrserver 8000, httpd 80, blobd 8080, tokend 9000 (see service_port).
# Arguments are split on blanks; there is no quoting and no globbing.  One host client at a time (QEMU's
# socket chardev serves one connection); a host client resynchronises with a fresh ping token.

export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run /www
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=64m tmpfs /tmp
hostname hft-guest

# Every problem is collected: the guest then reports HYBRIDFT-GUEST-FAILED instead of READY, so a
# misconfigured guest fails its test loudly instead of timing out on an unreachable address.
ERRORS=
log() { echo "hft-init: $*"; ERRORS="$ERRORS${ERRORS:+; }$*"; }

IP=10.77.0.2/24
GW=
SERVICES=echod,rrserver,httpd,blobd,tokend
IPV6=0
RUNS=
for word in $(cat /proc/cmdline); do
    case "$word" in
        hft.ip=*) IP=${word#hft.ip=} ;;
        hft.gw=*) GW=${word#hft.gw=} ;;
        hft.services=*) SERVICES=${word#hft.services=} ;;
        hft.ipv6=*) IPV6=${word#hft.ipv6=} ;;
        hft.run=*) RUNS="$RUNS ${word#hft.run=}" ;;
    esac
done

for m in $(cat /etc/hft-modules); do
    insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done

if [ "$IPV6" != 1 ] && [ -e /proc/sys/net/ipv6/conf/default/disable_ipv6 ]; then
    echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
    echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
fi

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip addr add "$IP" dev eth0 || log "bad hft.ip=$IP"
    ip link set eth0 up
    [ -n "$GW" ] && { ip route add default via "$GW" || log "bad hft.gw=$GW"; }
    # ready means reachable: a client's first SYN must not be dropped while the link comes up
    i=0
    while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
else
    log "no eth0 (virtio_net missing?)"
fi

blobgen 8388608 > /www/blob || log "blobgen failed"

# Services.  Each runs in the foreground of its own process (httpd with -f), so its pid is the server's:
# /run/service.NAME holds it and "stop" ends it by that pid.  Like a "run" job, a service is started from
# a command substitution that exits at once, so it becomes init's child (see start_job).
service_port() {
    case "$1" in
        echod) echo 7 ;;
        rrserver) echo 8000 ;;
        httpd) echo 80 ;;
        blobd) echo 8080 ;;
        tokend) echo 9000 ;;
        *) return 1 ;;
    esac
}
ALL_SERVICES="echod rrserver httpd blobd tokend"
# true when something listens on TCP port $1, on any address, IPv4 or IPv6 (busybox httpd takes an IPv6 one)
listening() {
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ":$(printf '%04X' "$1") 0*:0000 0A"
}
# the pid of service $1 if it runs (a zombie or a reused pid does not count)
service_pid() {
    local spid
    spid=$(cat "/run/service.$1" 2>/dev/null) || return 1
    [ "$(cat "/proc/$spid/comm" 2>/dev/null)" = "$1" ] || return 1
    set -- $(cat "/proc/$spid/stat" 2>/dev/null)
    [ -n "$3" ] && [ "$3" != Z ] && echo "$spid"
}
launch_service() {
    local port spid
    port=$(service_port "$1") || return 2
    if [ "$1" = httpd ]; then set -- httpd -f -p "$port" -h /www; else set -- "$1" "$port"; fi
    spid=$("$@" < /dev/null >> "/tmp/$1.log" 2>&1 & echo $!)
    echo "$spid" > "/run/service.$1"
}
# ready means serving: wait (up to 3 s) until service $1 listens on its port
await_service() {
    local port i
    port=$(service_port "$1")
    i=0
    while ! listening "$port" && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
    listening "$port"
}
start_service() {
    local spid
    service_port "$1" > /dev/null || { echo "ERR unknown service: $1"; return 2; }
    if ! spid=$(service_pid "$1"); then
        launch_service "$1"
        await_service "$1" || { echo "ERR $1 is not listening on port $(service_port "$1")"; return 1; }
        spid=$(service_pid "$1") || { echo "ERR $1 exited"; return 1; }
    fi
    echo "PID $spid"
}
# stopped means refused: wait (up to 3 s) until the process is gone and nothing listens on its port
stop_service() {
    local port spid i
    port=$(service_port "$1") || { echo "ERR unknown service: $1"; return 2; }
    if spid=$(service_pid "$1"); then
        kill "$spid"
        i=0
        while { service_pid "$1" > /dev/null || listening "$port"; } && [ $i -lt 30 ]; do
            sleep 0.1; i=$((i + 1))
        done
        if service_pid "$1" > /dev/null || listening "$port"; then echo "ERR $1 did not stop"; return 1; fi
    fi
    rm -f "/run/service.$1"
    echo "STOPPED $1"
}

for s in $(echo "$SERVICES" | tr , ' '); do
    case "$s" in
        none) ;;
        *) launch_service "$s" || log "unknown service $s" ;;
    esac
done
# ready means serving: every service listens before the guest says READY
for s in $(echo "$SERVICES" | tr , ' '); do
    port=$(service_port "$s") || continue
    await_service "$s" || log "$s is not listening on port $port"
done

: > /run/jobs
JOBSEQ=0
start_job() {
    JOBSEQ=$((JOBSEQ + 1))
    tmp="/tmp/.job.$JOBSEQ"
    # Started from a command substitution that exits at once, the job becomes init's child: its exit
    # never signals the control loop, whose busybox `read` would drop a half-read line on SIGCHLD.
    pid=$("$@" < /dev/null > "$tmp" 2>&1 & echo $!)
    mv "$tmp" "/tmp/$(basename "$1").$pid.log"
    echo "$pid $*" >> /run/jobs
}
set -f  # hft.run words are taken literally, no globbing
for r in $RUNS; do
    # shellcheck disable=SC2046
    start_job $(echo "$r" | tr , ' ')
done
set +f

if [ -n "$ERRORS" ]; then
    echo "HYBRIDFT-GUEST-FAILED $ERRORS"
else
    echo "HYBRIDFT-GUEST-READY ip=$IP services=$SERVICES"
fi

control_loop() {
    tty=$1
    stty -F "$tty" raw -echo 115200 2>/dev/null
    exec 0<"$tty" 1>"$tty" 2>&1
    echo "HFT-CONTROL-READY"
    set -f  # words from the host are literal: "run echo *" passes a star, not file names
    while IFS= read -r line; do
        set -- $line
        verb=$1
        [ $# -gt 0 ] && shift
        rc=0
        case "$verb" in
            "") continue ;;
            ping) echo "PONG $*" ;;
            run)
                if [ $# -eq 0 ]; then echo "ERR run needs a program"; rc=2
                elif ! command -v "$1" > /dev/null; then echo "ERR no such program: $1"; rc=127
                else start_job "$@"; echo "PID $pid"
                fi ;;
            sh)
                # captured, so that output without a final newline cannot hide the end marker
                out=$(sh -c "$*" < /dev/null 2>&1)
                rc=$?
                [ -n "$out" ] && printf '%s\n' "$out" ;;
            kill)
                if [ -n "$2" ]; then kill -"$2" "$1" 2>&1; else kill "$1" 2>&1; fi
                rc=$? ;;
            start)
                if [ $# -ne 1 ]; then echo "ERR start needs one service"; rc=2
                else start_service "$1"; rc=$?
                fi ;;
            stop)
                if [ $# -ne 1 ]; then echo "ERR stop needs one service"; rc=2
                else stop_service "$1"; rc=$?
                fi ;;
            services)
                for s in $ALL_SERVICES; do
                    if spid=$(service_pid "$s"); then echo "$s $(service_port "$s") running $spid"
                    else echo "$s $(service_port "$s") stopped"
                    fi
                done ;;
            jobs)
                while read -r jpid jcmd; do
                    # a zombie not yet reaped by init has exited too
                    set -- $(cat "/proc/$jpid/stat" 2>/dev/null)
                    if [ -n "$3" ] && [ "$3" != Z ]; then state=running; else state=exited; fi
                    echo "$jpid $state $jcmd"
                done < /run/jobs ;;
            *) echo "ERR unknown command: $verb"; rc=2 ;;
        esac
        echo "HFT-END $rc"
    done
}

if [ -e /dev/ttyS1 ]; then
    control_loop /dev/ttyS1 &
fi
# PID 1 must never exit; it also reaps orphans.
while :; do wait; sleep 1; done
