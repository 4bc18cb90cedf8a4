// The emulator's scheduler and its C interface (ctypes, tests/cuda_emu.py). See emu.h.
//
// A launch runs the blocks of the grid one after another. Within a block every CUDA thread is a
// fiber with its own stack; fibers run in thread order until they finish or reach a barrier
// (__syncthreads, or a shuffle, which is a barrier of its warp). When no fiber can run, the
// scheduler releases a warp whose live lanes all wait at a shuffle, or else the block if all of its
// live threads wait at the same __syncthreads; otherwise the launch fails with a message (on a GPU
// it would hang or silently misbehave).
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include "emu.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

// switch_stack(save, load): push the callee-saved registers, store the stack pointer in *save, load
// `load` as the stack pointer, pop the registers it saved and return into that stack's code.
extern "C" void emu_switch_stack(void** save, void* load);
#if defined(__x86_64__)
asm(R"(
    .text
    .globl emu_switch_stack
    .hidden emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
)");
#else
#error "the kernel emulator's fiber switch is written for x86-64"
#endif

namespace emu {
namespace {

enum class State { Ready, AtSync, AtShuffle, Done };
constexpr size_t GATHER_BYTES = 64;

struct PendingCopy {
    void* dst;
    size_t size;
    unsigned char bytes[16];
};

struct Fiber {
    void* sp;                        // saved stack pointer while switched out
    State state;
    dim3 tid;
    int lane, warp;
    uint64_t shuffle_value;
    int shuffle_src;
    unsigned int shuffle_mask;
    unsigned char gathered[2][GATHER_BYTES];   // warp_gather's contributions, alternating between calls
    int gather_parity;
    std::vector<PendingCopy> copies;          // cp.async copies started and not yet landed
    size_t committed;                         // copies[0, committed) are in closed groups
    const char* sync_file;
    int sync_line;
};

constexpr size_t STACK_BYTES = 256 * 1024;

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

std::vector<Fiber> fibers;
std::vector<char*> stacks;
void* scheduler_sp = nullptr;
int current = -1;
const Kernel* running = nullptr;
void** running_args = nullptr;
std::string failure;                 // set by a fiber that found an error; the launch stops
bool reverse_order = false;          // run blocks, and threads within a block, last to first
sigjmp_buf segv_jump;
volatile void* segv_address = nullptr;

void yield_to_scheduler() { emu_switch_stack(&fibers[current].sp, scheduler_sp); }

[[noreturn]] void fiber_main() {
    running->invoke(running->fn, running_args);
    fibers[current].state = State::Done;
    yield_to_scheduler();            // never resumed
    __builtin_unreachable();
}

// A fresh stack that emu_switch_stack "returns" into fiber_main on, as if fiber_main had been called.
void* initial_stack(char* base) {
    auto top = reinterpret_cast<uintptr_t>(base + STACK_BYTES) & ~uintptr_t(15);
    auto* sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                   // fiber_main's return address: never used
    *--sp = reinterpret_cast<void*>(&fiber_main);      // emu_switch_stack's `ret` goes here
    for (int i = 0; i < 6; i++) *--sp = nullptr;       // rbp, rbx, r12-r15
    return sp;
}

void fail(const std::string& message) {
    if (failure.empty()) failure = message;
    yield_to_scheduler();            // never resumed: the scheduler abandons the launch
}

void ensure_stacks(size_t n) {
    while (stacks.size() < n) {
        void* p = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        stacks.push_back(static_cast<char*>(p));
    }
}

std::string where(const Fiber& f) {
    char buf[128];
    snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z,
             f.tid.x, f.tid.y, f.tid.z);
    return buf;
}

// Runs one block to completion; returns false (with `failure` set) on an error.
bool run_block() {
    const int n = int(blockDim.x * blockDim.y * blockDim.z);
    fibers.assign(n, Fiber{});
    for (int i = 0; i < n; i++) {
        Fiber& f = fibers[i];
        f.sp = initial_stack(stacks[i]);
        f.state = State::Ready;
        f.tid = dim3{unsigned(i % blockDim.x), unsigned(i / blockDim.x % blockDim.y),
                     unsigned(i / (blockDim.x * blockDim.y))};
        f.lane = i % 32;
        f.warp = i / 32;
    }
    const int num_warps = (n + 31) / 32;
    for (;;) {
        for (int k = 0; k < n; k++) {
            const int i = reverse_order ? n - 1 - k : k;
            if (fibers[i].state != State::Ready) continue;
            current = i;
            threadIdx = fibers[i].tid;
            emu_switch_stack(&scheduler_sp, fibers[i].sp);
            if (!failure.empty()) return false;
        }
        bool released = false, all_done = true;
        for (int w = 0; w < num_warps; w++) {
            int live = 0, waiting = 0;
            const int lanes = std::min(32, n - 32 * w);
            for (int l = 0; l < lanes; l++) {
                const Fiber& f = fibers[32 * w + l];
                live += f.state != State::Done;
                waiting += f.state == State::AtShuffle;
            }
            if (live) all_done = false;
            if (!live || waiting != live) continue;
            for (int l = 0; l < lanes; l++) {
                Fiber& f = fibers[32 * w + l];
                if (f.state == State::Done) continue;
                for (int k = 0; k < lanes; k++) {   // every lane the mask names must take part
                    if ((f.shuffle_mask >> k & 1u) && fibers[32 * w + k].state == State::Done) {
                        failure = "shuffle with mask " + std::to_string(f.shuffle_mask) + " at " + where(f) +
                                  " after lane " + std::to_string(k) + " of its warp exited";
                        return false;
                    }
                }
            }
            uint64_t values[32];
            for (int l = 0; l < lanes; l++) values[l] = fibers[32 * w + l].shuffle_value;
            for (int l = 0; l < lanes; l++) {
                Fiber& f = fibers[32 * w + l];
                if (f.state == State::Done) continue;
                if (f.shuffle_src < 0 || f.shuffle_src >= lanes) {
                    failure = "shuffle from lane " + std::to_string(f.shuffle_src) + " outside the warp at " + where(f);
                    return false;
                }
                f.shuffle_value = values[f.shuffle_src];
                f.state = State::Ready;
            }
            released = true;
        }
        if (all_done) return true;
        if (released) continue;
        int live = 0, at_sync = 0;
        for (const Fiber& f : fibers) {
            live += f.state != State::Done;
            at_sync += f.state == State::AtSync;
        }
        if (at_sync == live) {
            const Fiber* first = nullptr;
            for (const Fiber& f : fibers) {
                if (f.state != State::AtSync) continue;
                if (!first) {
                    first = &f;
                } else if (f.sync_line != first->sync_line || strcmp(f.sync_file, first->sync_file) != 0) {
                    failure = "divergent __syncthreads: " + where(*first) + " waits at " + first->sync_file + ":" +
                              std::to_string(first->sync_line) + " and " + where(f) + " at " + f.sync_file + ":" +
                              std::to_string(f.sync_line);
                    return false;
                }
            }
            for (Fiber& f : fibers)
                if (f.state == State::AtSync) f.state = State::Ready;
            continue;
        }
        for (const Fiber& f : fibers) {
            if (f.state == State::AtShuffle) {
                failure = "deadlock: " + where(f) + " waits at a shuffle while other threads of its warp "
                          "wait at __syncthreads (divergent barrier)";
                return false;
            }
        }
        failure = "deadlock: threads wait at different barriers";
        return false;
    }
}

void on_segv(int, siginfo_t* info, void*) {
    segv_address = info->si_addr;
    siglongjmp(segv_jump, 1);
}

}  // namespace

void check_aligned(const void* p, size_t bytes, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
    char buf[160];
    snprintf(buf, sizeof buf, "misaligned %s at %p (%zu-byte alignment required) in ", what, p, bytes);
    fail(buf + where(fibers[current]));
}

void syncthreads(const char* file, int line) {
    fibers[current].sync_file = file;
    fibers[current].sync_line = line;
    fibers[current].state = State::AtSync;
    yield_to_scheduler();
}

uint64_t shuffle(unsigned int mask, uint64_t value, int src_lane) {
    Fiber& f = fibers[current];
    if (!(mask >> f.lane & 1u)) fail("shuffle by a lane that is not in its own mask at " + where(f));
    f.shuffle_mask = mask;
    f.shuffle_value = value;
    f.shuffle_src = src_lane;
    f.state = State::AtShuffle;
    yield_to_scheduler();
    return fibers[current].shuffle_value;
}

int lane_id() { return fibers[current].lane; }

void async_copy(void* dst, const void* src, size_t bytes) {
    check_aligned(dst, bytes, "cp.async destination");
    check_aligned(src, bytes, "cp.async source");
    PendingCopy c;
    c.dst = dst;
    c.size = bytes;
    memcpy(c.bytes, src, bytes);
    fibers[current].copies.push_back(c);
}

void async_commit() { fibers[current].committed = fibers[current].copies.size(); }

void async_wait_all() {
    Fiber& f = fibers[current];
    for (size_t i = 0; i < f.committed; i++) memcpy(f.copies[i].dst, f.copies[i].bytes, f.copies[i].size);
    f.copies.erase(f.copies.begin(), f.copies.begin() + long(f.committed));
    f.committed = 0;
}

// One barrier of the warp (a full-mask shuffle). Contributions alternate between two slots: a lane
// that runs ahead writes the other slot, and it cannot get two calls ahead, since the next call's
// barrier waits for every lane, which by then has read this call's slot.
void warp_gather(const void* mine, size_t bytes, void* all) {
    Fiber& f = fibers[current];
    if (bytes > GATHER_BYTES) fail("warp_gather of more than " + std::to_string(GATHER_BYTES) + " bytes");
    if (32 * (f.warp + 1) > int(fibers.size())) fail("a warp-wide matrix instruction in a partial warp at " + where(f));
    const int slot = f.gather_parity;
    f.gather_parity ^= 1;
    memcpy(f.gathered[slot], mine, bytes);
    shuffle(0xffffffffu, 0, f.lane);                 // fibers is not resized during a block: f stays valid
    for (int l = 0; l < 32; l++) {
        memcpy(static_cast<unsigned char*>(all) + l * bytes, fibers[32 * f.warp + l].gathered[slot], bytes);
    }
}

void register_kernel(Kernel k) { registry()[k.name] = k; }

// Static __shared__ variables are thread_local (emu.h), so they sit in this library's TLS block
// beside the `extern __shared__` arrays; and as blocks run one after another on one OS thread, a
// block would find what the previous block left there (or zeros, for the first), where a GPU gives
// it garbage. The spans below are that block less the extern arrays: every block starts with them
// filled with NaN bytes, as the extern arrays are.
struct Span {
    unsigned char* begin;
    size_t size;
};
thread_local unsigned char tls_probe;   // touched first, so that this thread's TLS block exists

int find_tls_block(dl_phdr_info* info, size_t, void* data) {
    auto* block = static_cast<Span*>(data);
    const auto self = reinterpret_cast<ElfW(Addr)>(&find_tls_block);
    bool mine = false;
    size_t tls_size = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        const ElfW(Addr) start = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && self >= start && self < start + ph.p_memsz) mine = true;
        if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
    }
    if (!mine) return 0;
    *block = {static_cast<unsigned char*>(info->dlpi_tls_data), tls_size};
    return 1;
}

std::vector<Span> find_static_shared_spans() {
    *static_cast<volatile unsigned char*>(&tls_probe) = 0;
    Span block{nullptr, 0};
    dl_iterate_phdr(find_tls_block, &block);
    if (!block.begin) return {};
    std::vector<unsigned char*> arrays;     // each MAX_DYNAMIC_SHARED_BYTES long
    for (const auto& entry : registry()) {
        const Kernel& k = entry.second;
        if (k.dynamic_shared) arrays.push_back(reinterpret_cast<unsigned char*>(k.dynamic_shared()));
    }
    std::sort(arrays.begin(), arrays.end());
    arrays.erase(std::unique(arrays.begin(), arrays.end()), arrays.end());
    std::vector<Span> spans;
    unsigned char* at = block.begin;
    for (unsigned char* a : arrays) {
        if (a > at) spans.push_back({at, size_t(a - at)});
        at = std::max(at, a + MAX_DYNAMIC_SHARED_BYTES);
    }
    if (block.begin + block.size > at) spans.push_back({at, size_t(block.begin + block.size - at)});
    return spans;
}

// The spans, found once per OS thread that launches (the TLS block is the thread's; the registry is
// complete once the library is loaded). Not thread_local themselves: that memory is what gets filled.
const std::vector<Span>& static_shared_spans() {
    static std::vector<Span> spans;
    static pthread_t owner;
    static bool found = false;
    if (!found || !pthread_equal(owner, pthread_self())) {
        spans = find_static_shared_spans();
        owner = pthread_self();
        found = true;
    }
    return spans;
}

}  // namespace emu

// ---- C interface ---------------------------------------------------------------------------------
extern "C" {

int emu_num_kernels() { return int(emu::registry().size()); }

// 1: run blocks and the threads of a block in reverse order from now on (0: in order). A kernel
// whose threads or blocks communicate without a barrier (a race) gives different results.
void emu_set_reverse_order(int reverse) { emu::reverse_order = reverse != 0; }

// name and parameter codes of kernel i (in name order): "Pf" = pointer to float, "i4" = 4-byte int
int emu_kernel_info(int i, char* name, int name_len, char* params, int params_len) {
    auto it = emu::registry().begin();
    std::advance(it, i);
    std::string p;
    for (const emu::Param& q : it->second.params) {
        if (p.size()) p += ',';
        p += q.pointer ? std::string("P") + q.type : std::string(1, q.type) + std::to_string(q.size);
    }
    snprintf(name, name_len, "%s", it->first.c_str());
    snprintf(params, params_len, "%s", p.c_str());
    return 0;
}

// Launch `name` over grid x block; args[i] points at the i-th argument's value, exactly as for
// cuLaunchKernel. Returns 0, or 1 with a message in `error`; 2 if it touched a guard page
// (*fault_address says where).
int emu_launch(const char* name, const unsigned int* grid, const unsigned int* block, size_t shared_mem,
               void** args, int nargs, char* error, int error_len, void** fault_address) {
    using namespace emu;
    auto it = registry().find(name);
    if (it == registry().end()) {
        snprintf(error, error_len, "no kernel %s in the emulator", name);
        return 1;
    }
    const Kernel& k = it->second;
    if (nargs != int(k.params.size())) {
        snprintf(error, error_len, "%s takes %d arguments, got %d", name, int(k.params.size()), nargs);
        return 1;
    }
    const size_t threads = size_t(block[0]) * block[1] * block[2];
    if (threads == 0 || threads > 1024 || block[2] > 64 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 ||
        grid[1] > 65535 || grid[2] > 65535) {
        snprintf(error, error_len, "%s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)", name,
                 grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    if (shared_mem > MAX_DYNAMIC_SHARED_BYTES) {
        snprintf(error, error_len, "%s: %zu bytes of dynamic shared memory exceed the %zu a block may have",
                 name, shared_mem, MAX_DYNAMIC_SHARED_BYTES);
        return 1;
    }
    if (shared_mem && !k.dynamic_shared) {
        snprintf(error, error_len, "%s: dynamic shared memory passed to a kernel that declares none", name);
        return 1;
    }
    ensure_stacks(threads);
    running = &k;
    running_args = args;
    failure.clear();
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};

    struct sigaction action = {}, old_segv = {}, old_bus = {};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
    int rc = 0;
    const std::vector<Span>& static_shared = static_shared_spans();
    if (sigsetjmp(segv_jump, 1) == 0) {
        const unsigned num_blocks = grid[0] * grid[1] * grid[2];
        for (unsigned j = 0; j < num_blocks && !rc; j++) {
            const unsigned b = reverse_order ? num_blocks - 1 - j : j;
            blockIdx = dim3{b % grid[0], b / grid[0] % grid[1], b / (grid[0] * grid[1])};
            // fresh blocks see garbage, not zeros or the last block's values: NaN bytes
            for (const Span& span : static_shared) memset(span.begin, 0xff, span.size);
            if (k.dynamic_shared) memset(k.dynamic_shared(), 0xff, MAX_DYNAMIC_SHARED_BYTES);
            if (!run_block()) rc = 1;
            if (!rc && k.dynamic_shared && shared_mem < MAX_DYNAMIC_SHARED_BYTES) {
                // a GPU gives the block shared_mem bytes; a kernel that wrote past them would have
                // overwritten another block's shared memory or faulted
                const auto* bytes = reinterpret_cast<const unsigned char*>(k.dynamic_shared());
                for (size_t i = shared_mem; i < MAX_DYNAMIC_SHARED_BYTES && !rc; i++) {
                    if (bytes[i] == 0xff) continue;
                    failure = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                              std::to_string(blockIdx.z) + ") wrote dynamic shared memory at byte " +
                              std::to_string(i) + ", past the " + std::to_string(shared_mem) +
                              " bytes the launch gave it";
                    rc = 1;
                }
            }
        }
    } else {
        *fault_address = const_cast<void*>(segv_address);
        snprintf(error, error_len, "%s: invalid memory access at %p in block (%u,%u,%u) thread (%u,%u,%u)", name,
                 *fault_address, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
        rc = 2;
    }
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    if (rc == 1) snprintf(error, error_len, "%s: %s", name, failure.c_str());
    running = nullptr;
    return rc;
}

}  // extern "C"
