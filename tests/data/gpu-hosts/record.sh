#!/bin/sh
# Records a GPU node's layout for the device model's tests: run on the node, from this directory.
# Reads /proc, /dev and /sys only.
set -eu
name=${1:?usage: record.sh NAME}
mkdir -p "$name/proc/driver"
cp /proc/devices "$name/proc/devices"
[ -d /proc/driver/nvidia/gpus ] && mkdir -p "$name/proc/driver/nvidia" && \
    cp -r /proc/driver/nvidia/gpus "$name/proc/driver/nvidia/"
[ -f /proc/driver/nvidia-caps/mig-minors ] && mkdir -p "$name/proc/driver/nvidia-caps" && \
    cp /proc/driver/nvidia-caps/mig-minors "$name/proc/driver/nvidia-caps/"
{
    echo "# path under /dev, major, minor (ls -l /dev/nvidia* /dev/nvidia-caps /dev/dri)"
    for f in /dev/nvidia* /dev/nvidia-caps/* /dev/nvidia-caps-imex-channels/* /dev/dri/* /dev/kfd /dev/accel/*; do
        [ -c "$f" ] || continue
        set -- $(stat -c '%t %T' "$f")
        echo "${f#/dev/} $((0x$1)) $((0x$2))"
    done
} > "$name/dev.txt"
{
    echo "# /sys/dev/char/MAJOR:MINOR/device -> PCI bus id (readlink)"
    for d in /sys/dev/char/*; do
        [ -e "$d/device" ] || continue
        number=${d##*/}
        case "$(readlink "$d/subsystem" 2>/dev/null)" in *drm|*accel) ;; *) continue ;; esac
        echo "$number $(basename "$(readlink -f "$d/device")")"
    done
} > "$name/sys.txt"
echo "recorded $name"
