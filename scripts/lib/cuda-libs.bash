# For scripts/gpu-check and scripts/gpu-bundle (sourced; tested by tests/tests/gpu.rs): where the
# CUDA libraries are, and which test binaries have GPU tests.
#
# NVIDIA's pip wheels (nvidia-cuda-nvrtc-cu12, nvidia-cublas-cu12, nvidia-nccl-cu12, and their
# -cu13 twins) put each library in site-packages/nvidia/<name>/lib and nothing on the loader's
# path, so a program that loads them by name (cudarc does) finds none of them. And the NCCL wheel
# (like Debian's libnccl2 package) ships only libnccl.so.2, a name cudarc does not try: it tries
# libnccl.so and libnccl.so.<CUDA major>.

# wheel_lib_dirs SITE_DIR...: every SITE_DIR/nvidia/*/lib, one a line. With no SITE_DIR, those
# of python3's site-packages (system, user and the active virtual environment).
wheel_lib_dirs() {
    local sites=("$@") site dir
    if [[ ${#sites[@]} -eq 0 ]]; then
        mapfile -t sites < <(python3 -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)
    fi
    for site in "${sites[@]}"; do
        for dir in "$site"/nvidia/*/lib; do
            if [[ -d $dir ]]; then
                echo "$dir"
            fi
        done
    done
}

# nccl_link LINK_DIR DIR...: where no DIR holds libnccl.so but one holds libnccl.so.N, links
# LINK_DIR/libnccl.so to the first such file and prints LINK_DIR; prints nothing otherwise.
nccl_link() {
    local link_dir=$1 dir file found=""
    shift
    for dir in "$@"; do
        if [[ -e $dir/libnccl.so ]]; then
            return 0
        fi
        for file in "$dir"/libnccl.so.[0-9]*; do
            if [[ -e $file && -z $found ]]; then
                found=$file
            fi
        done
    done
    if [[ -n $found ]]; then
        mkdir -p "$link_dir"
        ln -sfn "$found" "$link_dir/libnccl.so"
        echo "$link_dir"
    fi
}

# The test binaries cargo built, from the output of `cargo test --no-run` (file $1).
cargo_executables() {
    sed -n 's/^ *Executable .* (\(.*\))$/\1/p' "$1"
}

# How many ignored (GPU) tests test binary $1 has.
gpu_test_count() {
    local list
    list=$("$1" --ignored --list --format terse 2>/dev/null) || true
    grep -c ': test$' <<<"$list" || true
}

# cuda_majors DIR...: the CUDA major versions of the cuBLAS libraries in the DIRs
# (libcublas.so.12 is 12), one a line.
cuda_majors() {
    local dir file
    for dir in "$@"; do
        for file in "$dir"/libcublas.so.[0-9]*; do
            if [[ -e $file ]]; then
                file=${file##*/libcublas.so.}
                echo "${file%%.*}"
            fi
        done
    done | sort -u
}

# group_name PATH: a test binary's name without the hash cargo appends (cuda_ops-0123456789abcdef
# is cuda_ops).
group_name() {
    local name=${1##*/}
    if [[ $name =~ ^(.*)-[0-9a-f]{16}$ ]]; then
        name=${BASH_REMATCH[1]}
    fi
    echo "$name"
}
