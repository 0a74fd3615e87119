# shellcheck shell=bash
# Sourced on every node before torchrun: sets the NCCL environment for the fabric this node has
# (InfiniBand, RoCE or plain sockets) and turns on PyTorch's NCCL flight recorder.
#
#   FABRIC=ib|roce|socket    skip detection and use this fabric
#   INFINIBAND_SYSFS=DIR     where RDMA devices are listed (default /sys/class/infiniband)
#   RUN_DIR=DIR              flight recorder dumps go to DIR/nccl_trace/rank_<N>
#
# Any NCCL_* or TORCH_NCCL_* variable already set wins over what is detected here, so a site's
# known-good settings are never second-guessed. Prints one line saying what it chose and why.

_fabric_default_iface() {
    # The interface of the default route: the one other hosts can reach us on, which is what
    # NCCL's socket transport and bootstrap need (its own guess may pick a docker bridge).
    local iface dest _
    while read -r iface dest _; do
        [[ $dest == 00000000 ]] && { echo "$iface"; return; }
    done < <(tail -n +2 /proc/net/route 2>/dev/null)
}

_fabric_roce_gid_index() {  # _fabric_roce_gid_index DEVICE PORT: the RoCE v2 IPv4 GID, else v2
    local port_dir=$1/ports/$2 types_dir index type gid fallback=""
    types_dir=$port_dir/gid_attrs/types
    [[ -d $types_dir ]] || return 1
    # Sorted numerically so the lowest index wins, as NCCL users expect (3 on a typical ConnectX).
    for index in $(find "$types_dir" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n); do
        # Unpopulated entries fail to read (EINVAL) on a real kernel.
        type=$(cat "$types_dir/$index" 2>/dev/null) || continue
        [[ $type == "RoCE v2" ]] || continue
        gid=$(cat "$port_dir/gids/$index" 2>/dev/null) || continue
        [[ $gid == 0000:0000:0000:0000:0000:0000:0000:0000 ]] && continue
        # An IPv4-mapped GID (::ffff:a.b.c.d) routes across subnets; prefer it over link-local v6.
        if [[ $gid == 0000:0000:0000:0000:0000:ffff:* ]]; then
            echo "$index"
            return
        fi
        [[ -n $fallback ]] || fallback=$index
    done
    [[ -n $fallback ]] && echo "$fallback"
}

_fabric_setup() {
    local sysfs=${INFINIBAND_SYSFS:-/sys/class/infiniband}
    local ib_ports=() roce_ports=() dev port layer state fabric reason
    for dev in "$sysfs"/*; do
        [[ -d $dev/ports ]] || continue
        for port in "$dev"/ports/*; do
            state=$(cat "$port/state" 2>/dev/null) || continue
            [[ $state == *ACTIVE* ]] || continue
            layer=$(cat "$port/link_layer" 2>/dev/null) || continue
            case $layer in
                InfiniBand) ib_ports+=("${dev##*/}:${port##*/}") ;;
                Ethernet) roce_ports+=("${dev##*/}:${port##*/}") ;;
            esac
        done
    done

    if [[ -n ${FABRIC:-} ]]; then
        case $FABRIC in
            ib|roce|socket) fabric=$FABRIC; reason="FABRIC=$FABRIC set by the user" ;;
            *) echo "fabric: FABRIC is '$FABRIC'; allowed: ib, roce, socket (or unset to detect)" >&2
               return 1 ;;
        esac
    elif (( ${#ib_ports[@]} )); then
        fabric=ib; reason="active InfiniBand ports: ${ib_ports[*]}"
    elif (( ${#roce_ports[@]} )); then
        fabric=roce; reason="active Ethernet (RoCE) ports: ${roce_ports[*]}"
    else
        fabric=socket; reason="no active RDMA port under $sysfs"
    fi

    local hca_list=() gid_index iface
    case $fabric in
        ib) hca_list=("${ib_ports[@]}") ;;
        roce) hca_list=("${roce_ports[@]}") ;;
    esac
    if [[ $fabric == ib || $fabric == roce ]]; then
        export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
        if (( ${#hca_list[@]} )) && [[ -z ${NCCL_IB_HCA:-} ]]; then
            NCCL_IB_HCA=$(IFS=,; echo "${hca_list[*]}")
            export NCCL_IB_HCA
        fi
    fi
    if [[ $fabric == roce && -z ${NCCL_IB_GID_INDEX:-} ]]; then
        dev=${hca_list[0]%%:*}
        port=${hca_list[0]##*:}
        gid_index=""
        [[ -n $dev ]] && gid_index=$(_fabric_roce_gid_index "$sysfs/$dev" "$port")
        if [[ -n $gid_index ]]; then
            reason+="; RoCE v2 GID index $gid_index"
        else
            # 3 is the RoCE v2 IPv4 entry on a ConnectX port with one address: the usual answer.
            gid_index=3
            reason+="; no RoCE v2 GID found, GID index 3"
        fi
        export NCCL_IB_GID_INDEX=$gid_index
    fi
    if [[ $fabric == socket ]]; then
        export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}
        if [[ -z ${NCCL_SOCKET_IFNAME:-} ]]; then
            iface=$(_fabric_default_iface)
            if [[ -n $iface ]]; then
                export NCCL_SOCKET_IFNAME=$iface
                reason+="; sockets over $iface (default route)"
            else
                reason+="; no default route, NCCL picks the interface"
            fi
        fi
    fi
    export FABRIC=$fabric

    # Flight recorder: the last collectives of every rank, dumped when a collective times out,
    # which is what tells a hung rank from a slow one after the fact. TORCH_FR_* are PyTorch's
    # current names (2.13 warns on the older TORCH_NCCL_TRACE_BUFFER_SIZE and
    # TORCH_NCCL_DEBUG_INFO_TEMP_FILE, which a user may still set to the same effect).
    if [[ -z ${TORCH_FR_BUFFER_SIZE:-}${TORCH_NCCL_TRACE_BUFFER_SIZE:-} ]]; then
        export TORCH_FR_BUFFER_SIZE=2000
    fi
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    if [[ -n ${RUN_DIR:-} && -z ${TORCH_FR_DUMP_TEMP_FILE:-}${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-} ]]
    then
        mkdir -p "$RUN_DIR/nccl_trace"
        export TORCH_FR_DUMP_TEMP_FILE=$RUN_DIR/nccl_trace/rank_
    fi

    local chosen="" var
    for var in NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_IB_DISABLE NCCL_SOCKET_IFNAME; do
        [[ -n ${!var:-} ]] && chosen+=" $var=${!var}"
    done
    echo "fabric: $fabric ($reason):$chosen"
}

_fabric_setup
