# Shared by scripts/vm-cgroup2 and scripts/vm-node (sourced, not run): the host packages, the
# kernel and initramfs (Debian 12's linux-image-amd64, cached), staging CRIU into a tree, and
# booting a disk image in qemu with the console's CHECK/INFO/DONE lines followed.
#
# The caller sets REPO, HYPERBOX_CACHE, TIMEOUT and VERBOSE, and may set EXTRA_MODULES
# (more modules for the initramfs to load). The initramfs mounts /dev/vda and switch_roots
# into the program named by the kernel argument `hyperbox.init=` (default /hyperbox/init).

VM_CACHE=$HYPERBOX_CACHE/vm
RUN_DIR=$VM_CACHE/run
# Host tools the scripts need, and the Debian 12 packages that provide them.
HOST_PACKAGES=(qemu-system-x86 busybox-static e2fsprogs cpio kmod binutils)
# Modules the initramfs loads, in dependency order (Debian builds these as modules).
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
    crc32c-intel crc32c_generic jbd2 mbcache crc16 ext4 overlay
    # CRIU probes nftables when it starts, through libnftables, which exits when the kernel
    # has no nfnetlink (and with it, dumps a network namespace's conntrack table); it collects
    # a process tree's sockets through the sock_diag modules.
    nf_tables nf_conntrack_netlink unix_diag inet_diag tcp_diag udp_diag raw_diag af_packet_diag
    netlink_diag
    # The snapshotter's EROFS images, through loop devices on this kernel (6.1 has no
    # file-backed EROFS mounts).
    loop erofs
)
# Changes to the initramfs's init below must change this, so cached initramfs are rebuilt.
INITRAMFS_VERSION=2

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

vm_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}" >&2 ||
            { apt-get -q update >&2 && DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${missing[@]}" >&2; }
    fi
}

# Sets KDIR: the cached kernel (vmlinuz) and initramfs (initrd.gz). Takes the VM lock (fd 9)
# for the rest of the caller's run: one VM at a time on a host.
vm_kernel() {
    mkdir -p "$VM_CACHE/kernel" "$RUN_DIR"
    exec 9>"$VM_CACHE/lock"
    flock -n 9 || die "another VM script is running (lock $VM_CACHE/lock)"
    local key="initramfs=$INITRAMFS_VERSION ${MODULES[*]}"
    KDIR=$(find "$VM_CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' -exec test -e '{}/.done' ';' -print | sort -V | tail -n1)
    # An initramfs made for another list of modules (or another init) is made again.
    if [[ -n $KDIR && $(cat "$KDIR/modules.list" 2>/dev/null) != "$key" ]]; then
        log "the module list or the initramfs changed: rebuilding the initramfs"
        rm -rf "$KDIR"
        KDIR=
    fi
    [[ -n $KDIR ]] || vm_build_kernel "$key"
    log "kernel $(basename "$KDIR")"
}

vm_build_kernel() {
    local key=$1 pkg kver ird m ko
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [[ -n $pkg ]] || die "apt does not know linux-image-amd64's kernel package (apt-get update?)"
    KDIR=$VM_CACHE/kernel/$pkg
    log "fetching $pkg"
    rm -rf "$KDIR" && mkdir -p "$KDIR/deb"
    (cd "$KDIR/deb" && apt-get -q download "$pkg" >&2) || die "apt-get download $pkg failed"
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/x"
    kver=$(basename "$(ls -d "$KDIR"/x/lib/modules/*)")
    depmod -b "$KDIR/x" "$kver"
    # initramfs: static busybox, the modules, and an init that mounts the disk.
    ird=$KDIR/initramfs
    mkdir -p "$ird"/{bin,modules,proc,sys,dev,newroot}
    cp /bin/busybox "$ird/bin/busybox"
    for m in "${MODULES[@]}"; do
        modprobe -d "$KDIR/x" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r ko; do
        cp "$ko" "$ird/modules/"
        basename "$ko" >>"$ird/modules/order"
    done
    cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done
init=/hyperbox/init
for a in $(cat /proc/cmdline); do
    case $a in hyperbox.init=*) init=${a#hyperbox.init=} ;; esac
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
mount -t ext4 /dev/vda /newroot || { echo "initramfs: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
INIT
    chmod 755 "$ird/init"
    (cd "$ird" && find . | sort | cpio --quiet -o -H newc | gzip -1) >"$KDIR/initrd.gz"
    cp "$KDIR"/x/boot/vmlinuz-* "$KDIR/vmlinuz"
    rm -rf "$KDIR/x" "$KDIR/deb" "$ird"
    echo "$key" >"$KDIR/modules.list"
    touch "$KDIR/.done"
}

# CRIU into the tree STAGE (/usr/local/sbin/criu), with the libraries a minbase tree lacks:
# the host and the tree are the same Debian release. Returns 1 when the host has no CRIU.
vm_stage_criu() {
    local stage=$1 criu lib real dest
    criu=$(readlink -f "${HYPERBOX_PREFIX:-/opt/hyperbox}/bin/criu" 2>/dev/null || true)
    [[ -x $criu ]] || return 1
    mkdir -p "$stage/usr/local/sbin"
    cp "$criu" "$stage/usr/local/sbin/criu"
    vm_stage_libraries "$stage" "$criu"
}

# The shared libraries BINARY needs that the tree STAGE lacks, from the host.
vm_stage_libraries() {
    local stage=$1 bin=$2 lib real dest
    ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
        real=$(readlink -f "$lib")
        dest=$stage/usr/lib/x86_64-linux-gnu/$(basename "$lib")
        [[ -e $dest || -e $stage/lib/x86_64-linux-gnu/$(basename "$lib") ]] && continue
        cp "$real" "$stage/usr/lib/x86_64-linux-gnu/$(basename "$real")"
        [[ $(basename "$real") == $(basename "$lib") ]] ||
            ln -sfn "$(basename "$real")" "$dest"
    done
    ldconfig -r "$stage"
}

# Boots DISK (raw ext4) with KERNEL_CMDLINE, printing the console's CHECK/INFO/DONE lines
# (everything with VERBOSE=1). With REBOOT=1 the guest may reboot (qemu starts it again);
# it ends by powering off. Exit status 0 only if DONE came and every CHECK passed.
vm_boot() {
    local disk=$1 accel_kind accel cpus reboot_flag=(-no-reboot) qrc=0 qemu tailer t1 t2 passed failed
    ((${REBOOT:-0})) && reboot_flag=()
    # KVM where it can run a stock kernel. A PVM host (kvm_pvm: KVM nested through paging, as
    # in some cloud sandboxes) only runs guests built as PVM guests; Debian's kernel hangs
    # there in its decompressor, so such hosts emulate (TCG, several times slower).
    accel_kind=${HYPERBOX_VM_ACCEL:-}
    if [[ -z $accel_kind ]]; then
        if [[ ! -e /dev/kvm || -d /sys/module/kvm_pvm ]]; then accel_kind=tcg; else accel_kind=kvm; fi
    fi
    case $accel_kind in
        kvm) accel=(-accel kvm -cpu host) cpus=${HYPERBOX_VM_CPUS:-2} ;;
        # Two emulated CPUs soft-lock in `runc init` (kernel watchdog, minutes); one does not.
        tcg) accel=(-accel tcg -cpu max) cpus=${HYPERBOX_VM_CPUS:-1} ;;
        *) die "HYPERBOX_VM_ACCEL must be kvm or tcg, not '$accel_kind'" ;;
    esac
    LOG=$RUN_DIR/console.log
    : >"$LOG"
    log "booting with $accel_kind (timeout ${TIMEOUT}s, console in $LOG)"
    t1=$(date +%s)
    timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 \
        "${accel[@]}" -m 2048 -smp "$cpus" \
        -display none -monitor none -serial "file:$LOG" "${reboot_flag[@]}" -nic none \
        -kernel "$KDIR/vmlinuz" -initrd "$KDIR/initrd.gz" -append "$KERNEL_CMDLINE" \
        -drive "file=$disk,format=raw,if=virtio" </dev/null &
    qemu=$!
    if ((VERBOSE)); then
        tail -n +1 -f --pid="$qemu" "$LOG" >&2 &
    else
        tail -n +1 -f --pid="$qemu" "$LOG" | grep --line-buffered -aE '^(CHECK|INFO|DONE)' &
    fi
    tailer=$!
    wait "$qemu" || qrc=$?
    wait "$tailer" 2>/dev/null || true
    t2=$(date +%s)

    tr -d '\r' <"$LOG" >"$LOG.txt" && mv "$LOG.txt" "$LOG"
    passed=$(grep -ac '^CHECK [^ ]* PASS' "$LOG" || true)
    failed=$(grep -ac '^CHECK [^ ]* FAIL' "$LOG" || true)
    log "qemu exit $qrc; prepare $((t1 - T0))s, VM $((t2 - t1))s; $passed passed, $failed failed"
    if ! grep -aq '^DONE' "$LOG"; then
        ((qrc == 124 || qrc == 137)) && log "the VM ran past ${TIMEOUT}s"
        log "the guest did not finish; last console lines:"
        tail -n 30 "$LOG" >&2
        return 1
    fi
    ((failed == 0 && passed > 0))
}
