// emu_runtime.cpp: the execution engine behind cuda_emu.h. Compiled once into an object file that
// is linked into every emulated kernel module (see gpucnn/emulator/build.py).
//
// Each CUDA thread of a block is a fiber with its own small stack. A block's fibers take turns on
// one OS thread: the scheduler resumes every ready fiber in the launch's thread order and a fiber
// runs until it reaches __syncthreads, a warp intrinsic, or its end. The scheduler then releases
// the barrier once every live thread waits at it, and a warp operation once every lane named in
// its mask has arrived. Whatever cannot make progress is a deadlock, reported as an error.
// Different blocks run in parallel on a small pool of OS threads.
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(GPUCNN_EMU_UCONTEXT)
#define EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#define GPUCNN_EMU_RUNTIME 1
#include "cuda_emu.h"

namespace emu {

__thread ThreadState ts;

namespace {

constexpr unsigned kMaxThreads = 1024;        // threads per block
constexpr unsigned kMaxDynamicShared = 48 * 1024;
constexpr size_t kStackBytes = 64 * 1024;     // per fiber; a guard page sits below each stack
constexpr unsigned kMaxWorkers = 64;
constexpr unsigned kPermutedBlocksMax = 1u << 22;  // random block order: Fisher-Yates up to this many

enum FiberState : int { READY, AT_BARRIER, AT_WARP, EXITED };
enum Order : int { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_RANDOM = 2 };

const char* const kWarpOpNames[WARP_OP_COUNT] = {
    "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
    "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
const char* const kBarrierNames[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                     "__syncthreads_or"};

struct Fiber {
#ifdef EMU_USE_UCONTEXT
    ucontext_t context;
#else
    void* sp;  // saved stack pointer while switched out
#endif
    unsigned char* stack_top;
    uint3 tid;
    unsigned linear;  // x + y*bx + z*bx*by; lane = linear % 32
    int state;
    // The pending warp operation (AT_WARP) and the value every operation hands back.
    int warp_op;
    unsigned warp_mask;
    int warp_arg;
    int warp_width;
    int warp_bytes;
    unsigned long long warp_value;
    unsigned long long result;
};

struct Launch {
    const char* name;
    void (*kernel)(void**);
    void** args;
    uint3 grid;
    uint3 block;
    unsigned nthreads;
    unsigned long long nblocks;
    int order;
    unsigned long long seed;
    unsigned shared_bytes;        // dynamic shared memory of each block
    void* (*dynamic_shared)();    // the extern __shared__ array of the calling thread, or null
    unsigned* block_perm;         // random order over up to kPermutedBlocksMax blocks
    unsigned long long affine_a;  // random order over more blocks: (a*i + c) mod n
    unsigned long long affine_c;
    unsigned long long next;      // next position in block order (atomic)
    int failed;                   // atomic; the first failure writes err
    char* err;
    unsigned errlen;
};

struct Worker {
    unsigned char* stack_region;  // kMaxThreads slots of [guard page | stack], reserved once
    size_t slot_bytes;
    unsigned capacity;            // fibers with a usable stack so far
    Fiber* fibers;
    unsigned* order;
#ifdef EMU_USE_UCONTEXT
    ucontext_t scheduler;
#else
    void* scheduler_sp;
#endif
    Launch* launch;
    unsigned long long rng;
    unsigned long long seen_generation;
    // State of the block being run.
    uint3 block_idx;
    unsigned nthreads;
    unsigned live;
    unsigned at_barrier;
    unsigned exited;
    Fiber* first_exited;
    int barrier_op;
    int barrier_acc;
    unsigned sweep_pos;  // next position in the thread order during a sweep
    bool released;       // a warp group was released during the current sweep
    bool failed;
};

// ---- context switch --------------------------------------------------------------------------
void fiber_main();

#ifdef EMU_USE_UCONTEXT

void prepare_fiber(Fiber* f) {
    getcontext(&f->context);
    f->context.uc_stack.ss_sp = f->stack_top - kStackBytes;
    f->context.uc_stack.ss_size = kStackBytes;
    f->context.uc_link = nullptr;
    makecontext(&f->context, fiber_main, 0);
}
inline void switch_to_fiber(Worker* w, Fiber* f) { swapcontext(&w->scheduler, &f->context); }
inline void switch_to_scheduler(Worker* w, Fiber* f) { swapcontext(&f->context, &w->scheduler); }
inline void switch_between(Fiber* from, Fiber* to) { swapcontext(&from->context, &to->context); }

#else

extern "C" void emu_ctx_switch_v1(void** save_sp, void* load_sp) EMU_HIDDEN;
extern "C" void emu_fiber_entry_v1() EMU_HIDDEN;

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
// loads load_sp and pops the same registers from there. It leaves by an indirect jump rather than
// ret: a ret to another call site than the caller's is always mispredicted. MXCSR and the x87
// control word are left alone: kernels cannot change rounding modes, so all fibers share them.
asm(R"(
    .text
    .p2align 4
    .globl emu_ctx_switch_v1
    .hidden emu_ctx_switch_v1
    .type emu_ctx_switch_v1, @function
emu_ctx_switch_v1:
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
    popq %rcx
    jmpq *%rcx
    .size emu_ctx_switch_v1, .-emu_ctx_switch_v1

    .p2align 4
    .globl emu_fiber_entry_v1
    .hidden emu_fiber_entry_v1
    .type emu_fiber_entry_v1, @function
emu_fiber_entry_v1:
    callq *%r13
    ud2
    .size emu_fiber_entry_v1, .-emu_fiber_entry_v1
)");

// A fresh frame laid out as emu_ctx_switch_v1 leaves one: its first switch "returns" into
// emu_fiber_entry_v1, which calls fiber_main (held in r13) on a 16-byte aligned stack.
void prepare_fiber(Fiber* f) {
    unsigned long* sp = reinterpret_cast<unsigned long*>(f->stack_top) - 8;
    sp[0] = 0;                                                   // padding: keeps the entry call aligned
    sp[1] = 0;                                                   // r15
    sp[2] = 0;                                                   // r14
    sp[3] = reinterpret_cast<unsigned long>(&fiber_main);        // r13
    sp[4] = 0;                                                   // r12
    sp[5] = 0;                                                   // rbx
    sp[6] = 0;                                                   // rbp
    sp[7] = reinterpret_cast<unsigned long>(&emu_fiber_entry_v1);  // return address
    f->sp = sp + 1;
}
inline void switch_to_fiber(Worker* w, Fiber* f) { emu_ctx_switch_v1(&w->scheduler_sp, f->sp); }
inline void switch_to_scheduler(Worker* w, Fiber* f) { emu_ctx_switch_v1(&f->sp, w->scheduler_sp); }
inline void switch_between(Fiber* from, Fiber* to) { emu_ctx_switch_v1(&from->sp, to->sp); }

#endif

// ---- errors ------------------------------------------------------------------------------------
void set_launch_error(Launch* launch, const char* message) {
    if (__atomic_exchange_n(&launch->failed, 1, __ATOMIC_ACQ_REL) == 0 && launch->errlen > 0) {
        snprintf(launch->err, launch->errlen, "%s", message);
    }
}

// Fails the block with "kernel 'k', block (..), thread (..): <detail>"; thread may be null.
void block_fail(Worker* w, const Fiber* thread, const char* fmt, ...) {
    char detail[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    char message[1024];
    if (thread != nullptr) {
        snprintf(message, sizeof message, "kernel '%s', block (%u, %u, %u), thread (%u, %u, %u): %s",
                 w->launch->name, w->block_idx.x, w->block_idx.y, w->block_idx.z,
                 thread->tid.x, thread->tid.y, thread->tid.z, detail);
    } else {
        snprintf(message, sizeof message, "kernel '%s', block (%u, %u, %u): %s", w->launch->name,
                 w->block_idx.x, w->block_idx.y, w->block_idx.z, detail);
    }
    set_launch_error(w->launch, message);
    w->failed = true;
}

// From inside a fiber: fail and leave for good; the fiber's stack is simply reused later.
#define FIBER_FAIL(w, f, ...)             \
    do {                                  \
        block_fail((w), (f), __VA_ARGS__); \
        switch_to_scheduler((w), (f));    \
        __builtin_trap();                 \
    } while (0)

// The next ready thread of the current sweep, in the launch's thread order; null when the sweep is over.
Fiber* next_in_sweep(Worker* w) {
    const unsigned n = w->nthreads;
    const bool reverse = w->launch->order == ORDER_REVERSE;
    while (w->sweep_pos < n) {
        const unsigned k = w->sweep_pos++;
        Fiber* f = &w->fibers[reverse ? n - 1 - k : w->order[k]];
        if (f->state == READY) return f;
    }
    return nullptr;
}

// A fiber that blocks or exits hands over straight to the next ready fiber of the sweep (one switch
// instead of two through the scheduler), or to the scheduler when the sweep is over.
void leave(Worker* w, Fiber* f, ThreadState* state) {
    Fiber* next = w->failed ? nullptr : next_in_sweep(w);
    if (next == nullptr) {
        switch_to_scheduler(w, f);
        return;
    }
    state->thread_idx = next->tid;
    state->fiber = next;
    switch_between(f, next);
}

Worker* current_worker() {
    Worker* w = static_cast<Worker*>(ts.worker);
    if (w == nullptr || ts.fiber == nullptr) {
        fprintf(stderr, "gpucnn emulator: a CUDA intrinsic was called outside a kernel launch\n");
        abort();
    }
    return w;
}

// ---- barrier -----------------------------------------------------------------------------------
int barrier_op_impl(int op, int predicate) {
    Worker* w = current_worker();
    Fiber* f = static_cast<Fiber*>(ts.fiber);
    if (w->exited > 0) {
        const Fiber* gone = w->first_exited;
        FIBER_FAIL(w, f,
                   "divergent barrier: it reached %s after thread (%u, %u, %u) of the same block had "
                   "exited (an early return before a barrier?); every thread of a block must reach each "
                   "__syncthreads",
                   kBarrierNames[op], gone->tid.x, gone->tid.y, gone->tid.z);
    }
    if (w->at_barrier == 0) {
        w->barrier_op = op;
        w->barrier_acc = (op == BARRIER_AND) ? 1 : 0;
    } else if (w->barrier_op != op) {
        FIBER_FAIL(w, f, "it waits at %s while other threads of the block wait at %s", kBarrierNames[op],
                   kBarrierNames[w->barrier_op]);
    }
    if (op == BARRIER_COUNT) w->barrier_acc += predicate;
    if (op == BARRIER_AND) w->barrier_acc &= predicate;
    if (op == BARRIER_OR) w->barrier_acc |= predicate;
    f->state = AT_BARRIER;
    ++w->at_barrier;
    leave(w, f, &ts);
    return static_cast<int>(f->result);
}

// ---- warp operations ---------------------------------------------------------------------------
unsigned existing_lanes(const Worker* w, unsigned warp_base) {
    const unsigned count = w->nthreads - warp_base;
    return count >= 32 ? 0xffffffffu : (1u << count) - 1u;
}

unsigned long long poison_bits(int nbytes) {
    return nbytes >= 8 ? ~0ull : ((1ull << (8 * nbytes)) - 1ull);
}

// The source lane of a shuffle, as PTX shfl.sync defines it; an out-of-segment source is the lane itself.
unsigned shuffle_source(int op, unsigned lane, int arg, int width) {
    const int b = arg & 31;
    const int segmask = (32 - width) & 31;
    const int clamp = (op == WARP_SHFL_UP) ? 0 : 31;
    const int lane_i = static_cast<int>(lane);
    const int max_lane = (lane_i & segmask) | (clamp & ~segmask);
    const int min_lane = lane_i & segmask;
    int src = lane_i;
    bool in_range = true;
    switch (op) {
        case WARP_SHFL_UP: src = lane_i - b; in_range = src >= max_lane; break;
        case WARP_SHFL_DOWN: src = lane_i + b; in_range = src <= max_lane; break;
        case WARP_SHFL_XOR: src = lane_i ^ b; in_range = src <= max_lane; break;
        default: src = min_lane | (b & ~segmask); in_range = src <= max_lane; break;
    }
    return in_range ? static_cast<unsigned>(src) : lane;
}

// Every lane of `mask` waits at the same operation: hand each its result and make it ready.
void release_warp_group(Worker* w, unsigned warp_base, unsigned mask, int op) {
    Fiber* lanes = w->fibers + warp_base;
    unsigned votes = 0;
    for (unsigned j = 0; j < 32; ++j) {
        if (((mask >> j) & 1u) && lanes[j].warp_value != 0) votes |= 1u << j;
    }
    for (unsigned j = 0; j < 32; ++j) {
        if (!((mask >> j) & 1u)) continue;
        Fiber* g = &lanes[j];
        switch (op) {
            case WARP_BALLOT: g->result = votes; break;
            case WARP_ANY: g->result = votes != 0; break;
            case WARP_ALL: g->result = votes == mask; break;
            case WARP_SYNC: g->result = 0; break;
            default: {
                const unsigned src = shuffle_source(op, j, g->warp_arg, g->warp_width);
                // Reading a lane outside the mask is undefined in CUDA: hand back poison (NaN for floats).
                g->result = ((mask >> src) & 1u) ? lanes[src].warp_value : poison_bits(g->warp_bytes);
                break;
            }
        }
        g->state = READY;
    }
    w->released = true;
}

unsigned long long warp_exchange_impl(int op, unsigned mask, unsigned long long value, int arg, int width,
                                      int nbytes) {
    Worker* w = current_worker();
    Fiber* f = static_cast<Fiber*>(ts.fiber);
    const unsigned lane = f->linear & 31u;
    const unsigned base = f->linear - lane;
    const char* name = kWarpOpNames[op];
    if (!((mask >> lane) & 1u)) {
        FIBER_FAIL(w, f, "it calls %s with mask 0x%08x, which excludes its own lane %u", name, mask, lane);
    }
    if (op <= WARP_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
        FIBER_FAIL(w, f, "it calls %s with width %d; the width must be a power of two from 1 to 32", name, width);
    }
    const unsigned existing = existing_lanes(w, base);
    if (mask & ~existing) {
        const unsigned missing = __builtin_ctz(mask & ~existing);
        FIBER_FAIL(w, f,
                   "it calls %s with mask 0x%08x, which names lane %u of warp %u, but the block has %u "
                   "threads, so that lane does not exist",
                   name, mask, missing, base / 32, w->nthreads);
    }
    Fiber* lanes = w->fibers + base;
    for (unsigned j = 0; j < 32; ++j) {
        if (((mask >> j) & 1u) && lanes[j].state == EXITED) {
            FIBER_FAIL(w, f,
                       "it calls %s with mask 0x%08x, which names lane %u (thread (%u, %u, %u)) that has "
                       "already exited (a full-mask warp operation in divergent code?)",
                       name, mask, j, lanes[j].tid.x, lanes[j].tid.y, lanes[j].tid.z);
        }
    }
    f->warp_op = op;
    f->warp_mask = mask;
    f->warp_arg = arg;
    f->warp_width = width;
    f->warp_bytes = nbytes;
    f->warp_value = value;
    f->state = AT_WARP;

    bool complete = true;
    for (unsigned j = 0; j < 32; ++j) {
        if (!((mask >> j) & 1u) || j == lane) continue;
        const Fiber* g = &lanes[j];
        if (g->state != AT_WARP) {
            complete = false;
        } else if (g->warp_op != op || g->warp_mask != mask) {
            if ((g->warp_mask >> lane) & 1u) {
                FIBER_FAIL(w, f,
                           "lanes of warp %u disagree: lane %u calls %s with mask 0x%08x while lane %u waits in "
                           "%s with mask 0x%08x",
                           base / 32, lane, name, mask, j, kWarpOpNames[g->warp_op], g->warp_mask);
            }
            complete = false;
        }
    }
    if (complete) {
        release_warp_group(w, base, mask, op);  // the last lane to arrive goes on at once
    } else {
        leave(w, f, &ts);
    }
    return f->result;
}

// A thread has returned from the kernel.
void thread_exited(Worker* w, Fiber* f) {
    f->state = EXITED;
    --w->live;
    ++w->exited;
    if (w->first_exited == nullptr) w->first_exited = f;
    if (w->at_barrier > 0) {
        block_fail(w, f,
                   "divergent barrier: it exited while %u other thread(s) of the block wait at %s (an early "
                   "return before a barrier?); every thread of a block must reach each __syncthreads",
                   w->at_barrier, kBarrierNames[w->barrier_op]);
        return;
    }
    const unsigned lane = f->linear & 31u;
    Fiber* lanes = w->fibers + (f->linear - lane);
    for (unsigned j = 0; j < 32; ++j) {
        const Fiber* g = &lanes[j];
        if (f->linear - lane + j >= w->nthreads) break;
        if (g->state == AT_WARP && ((g->warp_mask >> lane) & 1u)) {
            block_fail(w, f,
                       "it exited while lane %u (thread (%u, %u, %u)) waits for it in %s with mask 0x%08x (a "
                       "full-mask warp operation in divergent code?)",
                       j, g->tid.x, g->tid.y, g->tid.z, kWarpOpNames[g->warp_op], g->warp_mask);
            return;
        }
    }
}

void fiber_main() {
    Worker* w = static_cast<Worker*>(ts.worker);
    Fiber* f = static_cast<Fiber*>(ts.fiber);
    w->launch->kernel(w->launch->args);
    thread_exited(w, f);
    leave(w, f, &ts);
    __builtin_trap();  // an exited fiber is never resumed
}

// ---- scheduling one block ----------------------------------------------------------------------
unsigned long long splitmix64(unsigned long long* state) {
    unsigned long long z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void shuffle(unsigned* items, unsigned count, unsigned long long* rng) {
    for (unsigned i = count; i > 1; --i) {
        const unsigned j = static_cast<unsigned>(splitmix64(rng) % i);
        const unsigned t = items[i - 1];
        items[i - 1] = items[j];
        items[j] = t;
    }
}

bool grow_stacks(Worker* w, unsigned needed) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (w->stack_region == nullptr) {
        w->slot_bytes = kStackBytes + page;
        void* region = mmap(nullptr, w->slot_bytes * kMaxThreads, PROT_NONE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (region == MAP_FAILED) return false;
        w->stack_region = static_cast<unsigned char*>(region);
        w->fibers = static_cast<Fiber*>(calloc(kMaxThreads, sizeof(Fiber)));
        w->order = static_cast<unsigned*>(calloc(kMaxThreads, sizeof(unsigned)));
        if (w->fibers == nullptr || w->order == nullptr) return false;
    }
    for (; w->capacity < needed; ++w->capacity) {
        unsigned char* slot = w->stack_region + w->slot_bytes * w->capacity;
        if (mprotect(slot + page, kStackBytes, PROT_READ | PROT_WRITE) != 0) return false;
        // Stagger the stack tops so that hot frames of different fibers do not share cache sets.
        w->fibers[w->capacity].stack_top = slot + w->slot_bytes - 64 * (w->capacity % 64);
    }
    return true;
}

struct TlsQuery {
    unsigned long address;  // of code in this module
    unsigned char* base;
    unsigned long size;
    bool found;
};

int find_tls_block(struct dl_phdr_info* info, size_t, void* data) {
    TlsQuery* q = static_cast<TlsQuery*>(data);
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        const unsigned long start = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && q->address >= start && q->address < start + ph.p_memsz) mine = true;
    }
    if (!mine) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            q->base = static_cast<unsigned char*>(info->dlpi_tls_data);
            q->size = info->dlpi_phdr[i].p_memsz;
        }
    }
    q->found = true;
    return 1;
}

// This OS thread's copy of the module's TLS block: the __shared__ variables plus `ts`.
bool locate_shared_memory() {
    if (ts.tls_base != nullptr) return true;
    TlsQuery q = {reinterpret_cast<unsigned long>(&find_tls_block), nullptr, 0, false};
    dl_iterate_phdr(find_tls_block, &q);
    unsigned char* self = reinterpret_cast<unsigned char*>(&ts);
    if (!q.found || q.base == nullptr || self < q.base || self + sizeof ts > q.base + q.size) return false;
    ts.tls_base = q.base;
    ts.tls_size = q.size;
    return true;
}

// 0xFF bytes over shared memory (a NaN for floats), keeping the runtime's own state: the whole TLS
// block but for the part of the 48 KiB extern __shared__ array beyond this launch's dynamic size.
void poison_shared_memory(unsigned shared_bytes) {
    const ThreadState saved = ts;
    unsigned char* end = saved.tls_base + saved.tls_size;
    if (saved.dynamic_shared != nullptr) {
        memset(saved.tls_base, 0xFF, saved.dynamic_shared + shared_bytes - saved.tls_base);
        memset(saved.dynamic_shared + kMaxDynamicShared, 0xFF, end - (saved.dynamic_shared + kMaxDynamicShared));
    } else {
        memset(saved.tls_base, 0xFF, saved.tls_size);
    }
    ts = saved;
}

uint3 unflatten(unsigned long long i, uint3 dims) {
    return uint3{static_cast<unsigned>(i % dims.x), static_cast<unsigned>((i / dims.x) % dims.y),
                 static_cast<unsigned>(i / (static_cast<unsigned long long>(dims.x) * dims.y))};
}

void describe_deadlock(Worker* w) {
    for (unsigned t = 0; t < w->nthreads; ++t) {
        const Fiber* f = &w->fibers[t];
        if (f->state != AT_WARP) continue;
        const unsigned lane = t & 31u;
        const Fiber* lanes = w->fibers + (t - lane);
        for (unsigned j = 0; j < 32; ++j) {
            if (!((f->warp_mask >> j) & 1u) || j == lane) continue;
            const Fiber* g = &lanes[j];
            if (g->state == AT_WARP && g->warp_op == f->warp_op && g->warp_mask == f->warp_mask) continue;
            char what[160];
            if (g->state == AT_BARRIER) {
                snprintf(what, sizeof what, "waits at %s", kBarrierNames[w->barrier_op]);
            } else {
                snprintf(what, sizeof what, "waits in %s with mask 0x%08x", kWarpOpNames[g->warp_op], g->warp_mask);
            }
            block_fail(w, f,
                       "deadlock: it waits in %s with mask 0x%08x for lane %u (thread (%u, %u, %u)), which %s "
                       "(a warp operation in divergent code?)",
                       kWarpOpNames[f->warp_op], f->warp_mask, j, g->tid.x, g->tid.y, g->tid.z, what);
            return;
        }
    }
    block_fail(w, nullptr, "deadlock: %u live threads, %u at the barrier, and none can proceed", w->live,
               w->at_barrier);
}

bool run_block(Worker* w, Launch* launch, unsigned long long linear_block) {
    const unsigned n = launch->nthreads;
    w->block_idx = unflatten(linear_block, launch->grid);
    poison_shared_memory(launch->shared_bytes);
    ts.block_idx = w->block_idx;
    w->nthreads = n;
    w->live = n;
    w->at_barrier = 0;
    w->exited = 0;
    w->first_exited = nullptr;
    w->failed = false;
    for (unsigned t = 0; t < n; ++t) {
        Fiber* f = &w->fibers[t];
        f->tid = unflatten(t, launch->block);
        f->linear = t;
        f->state = READY;
        f->warp_value = 0;
        f->result = 0;
        prepare_fiber(f);
        w->order[t] = t;
    }
    w->rng = launch->seed ^ (linear_block * 0xD1B54A32D192ED03ull);
    ThreadState* const state = &ts;  // one TLS lookup, not one per resume

    for (;;) {
        do {  // sweeps of the current phase, until no warp group is released any more
            w->released = false;
            if (launch->order == ORDER_RANDOM) shuffle(w->order, n, &w->rng);
            w->sweep_pos = 0;
            Fiber* first = next_in_sweep(w);
            if (first != nullptr) {  // the fibers pass control along the sweep and come back here at its end
                state->thread_idx = first->tid;
                state->fiber = first;
                switch_to_fiber(w, first);
            }
            if (w->failed) return false;
        } while (w->released);
        if (w->live == 0) return true;
        if (w->at_barrier != w->live) {
            describe_deadlock(w);
            return false;
        }
        for (unsigned t = 0; t < n; ++t) {  // every live thread is at the barrier: next phase
            Fiber* f = &w->fibers[t];
            if (f->state == AT_BARRIER) {
                f->result = static_cast<unsigned long long>(w->barrier_acc);
                f->state = READY;
            }
        }
        w->at_barrier = 0;
        if (__atomic_load_n(&launch->failed, __ATOMIC_RELAXED)) return false;  // another block failed
    }
}

unsigned long long block_at(const Launch* launch, unsigned long long position) {
    switch (launch->order) {
        case ORDER_REVERSE: return launch->nblocks - 1 - position;
        case ORDER_RANDOM:
            if (launch->block_perm != nullptr) return launch->block_perm[position];
            return static_cast<unsigned long long>(
                (static_cast<unsigned __int128>(launch->affine_a) * position + launch->affine_c) % launch->nblocks);
        default: return position;
    }
}

void run_blocks(Worker* w, Launch* launch) {
    ts.worker = w;
    w->launch = launch;
    if (!grow_stacks(w, launch->nthreads)) {
        set_launch_error(launch, "the emulator could not allocate fiber stacks (out of memory?)");
        ts.worker = nullptr;
        return;
    }
    if (!locate_shared_memory()) {
        set_launch_error(launch, "the emulator could not locate its thread-local shared memory block");
        ts.worker = nullptr;
        return;
    }
    if (launch->dynamic_shared != nullptr) {
        ts.dynamic_shared = static_cast<unsigned char*>(launch->dynamic_shared());
        if (ts.dynamic_shared < ts.tls_base ||
            ts.dynamic_shared + kMaxDynamicShared > ts.tls_base + ts.tls_size) {
            set_launch_error(launch, "the emulator found the extern __shared__ array outside its TLS block");
            ts.worker = nullptr;
            return;
        }
        // Blocks poison only the launch's dynamic size; the rest is poisoned once here, so reading past
        // the size the launch asked for also gives NaN (unless a block wrote there, out of bounds).
        memset(ts.dynamic_shared + launch->shared_bytes, 0xFF, kMaxDynamicShared - launch->shared_bytes);
    } else {
        ts.dynamic_shared = nullptr;
    }
    ts.grid_dim = launch->grid;
    ts.block_dim = launch->block;
    for (;;) {
        if (__atomic_load_n(&launch->failed, __ATOMIC_RELAXED)) break;
        const unsigned long long position = __atomic_fetch_add(&launch->next, 1ull, __ATOMIC_RELAXED);
        if (position >= launch->nblocks) break;
        if (!run_block(w, launch, block_at(launch, position))) break;
    }
    ts.worker = nullptr;
    ts.fiber = nullptr;
}

// ---- worker pool -------------------------------------------------------------------------------
struct Pool {
    pthread_mutex_t launch_lock;  // one launch at a time per module
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_cond_t done;
    unsigned threads;             // pool threads besides the launching thread
    unsigned long long generation;
    Launch* launch;
    unsigned running;
    bool atfork_registered;
    Worker workers[kMaxWorkers];  // [0] is the launching thread
};

Pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
             PTHREAD_COND_INITIALIZER, 0, 0, nullptr, 0, false, {}};

void* pool_thread(void* arg) {
    Worker* w = static_cast<Worker*>(arg);
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == w->seen_generation) pthread_cond_wait(&pool.wake, &pool.lock);
        w->seen_generation = pool.generation;
        Launch* launch = pool.launch;
        pthread_mutex_unlock(&pool.lock);
        run_blocks(w, launch);
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0) pthread_cond_signal(&pool.done);
    }
    return nullptr;
}

// A forked child has none of the parent's pool threads: start over with none.
void reset_pool_after_fork() {
    pthread_mutex_init(&pool.launch_lock, nullptr);
    pthread_mutex_init(&pool.lock, nullptr);
    pthread_cond_init(&pool.wake, nullptr);
    pthread_cond_init(&pool.done, nullptr);
    pool.threads = 0;
    pool.running = 0;
}

unsigned configured_workers() {
    const char* env = getenv("GPUCNN_EMULATOR_THREADS");
    long count = env != nullptr ? strtol(env, nullptr, 10) : 0;
    if (count < 1) {
        cpu_set_t set;
        count = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : sysconf(_SC_NPROCESSORS_ONLN);
    }
    if (count < 1) count = 1;
    return count > static_cast<long>(kMaxWorkers) ? kMaxWorkers : static_cast<unsigned>(count);
}

// Grows the pool to `wanted` threads; called with launch_lock held and no launch running.
void ensure_pool_threads(unsigned wanted) {
    if (!pool.atfork_registered) {
        pthread_atfork(nullptr, nullptr, reset_pool_after_fork);
        pool.atfork_registered = true;
    }
    while (pool.threads < wanted) {
        Worker* w = &pool.workers[pool.threads + 1];
        w->seen_generation = pool.generation;
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&thread, &attr, pool_thread, w);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;  // run with the threads there are
        ++pool.threads;
    }
}

bool set_dims(uint3* out, const unsigned* dims) {
    *out = uint3{dims[0], dims[1], dims[2]};
    return dims[0] > 0 && dims[1] > 0 && dims[2] > 0;
}

}  // namespace

int barrier(int op, int predicate) { return barrier_op_impl(op, predicate); }

unsigned long long warp_exchange(int op, unsigned int mask, unsigned long long value, int arg, int width,
                                 int nbytes) {
    return warp_exchange_impl(op, mask, value, arg, width, nbytes);
}

unsigned int active_mask() {
    Worker* w = current_worker();
    const Fiber* f = static_cast<Fiber*>(ts.fiber);
    const unsigned base = f->linear & ~31u;
    const unsigned existing = existing_lanes(w, base);
    unsigned mask = 0;
    for (unsigned j = 0; j < 32; ++j) {
        if (((existing >> j) & 1u) && w->fibers[base + j].state != EXITED) mask |= 1u << j;
    }
    return mask;
}

void trap(const char* what) {
    Worker* w = current_worker();
    Fiber* f = static_cast<Fiber*>(ts.fiber);
    FIBER_FAIL(w, f, "%s", what);
}

int launch(const char* name, void (*kernel)(void**), const unsigned int* grid, const unsigned int* block,
           unsigned int shared_bytes, void* (*dynamic_shared)(), int order, unsigned long long seed, void** args,
           char* err, unsigned int errlen) {
    Launch L = {};
    L.name = name;
    L.kernel = kernel;
    L.args = args;
    L.order = order;
    L.seed = seed;
    L.shared_bytes = shared_bytes;
    L.dynamic_shared = dynamic_shared;
    L.err = err;
    L.errlen = errlen;
    if (errlen > 0) err[0] = '\0';
    if (!set_dims(&L.grid, grid) || !set_dims(&L.block, block)) {
        snprintf(err, errlen, "kernel '%s': grid and block dimensions must all be at least 1", name);
        return 1;
    }
    const unsigned long long nthreads = static_cast<unsigned long long>(L.block.x) * L.block.y * L.block.z;
    if (nthreads > kMaxThreads) {
        snprintf(err, errlen, "kernel '%s': a block of %llu threads exceeds the limit of %u", name, nthreads,
                 kMaxThreads);
        return 1;
    }
    if (shared_bytes > kMaxDynamicShared) {
        snprintf(err, errlen,
                 "kernel '%s': %u bytes of dynamic shared memory exceed the 48 KiB (49152 bytes) limit", name,
                 shared_bytes);
        return 1;
    }
    if (order < ORDER_FORWARD || order > ORDER_RANDOM) {
        snprintf(err, errlen, "kernel '%s': unknown thread order %d", name, order);
        return 1;
    }
    L.nthreads = static_cast<unsigned>(nthreads);
    L.nblocks = static_cast<unsigned long long>(L.grid.x) * L.grid.y * L.grid.z;

    pthread_mutex_lock(&pool.launch_lock);
    unsigned long long rng = seed;
    if (order == ORDER_RANDOM) {
        if (L.nblocks <= kPermutedBlocksMax) {
            L.block_perm = static_cast<unsigned*>(malloc(sizeof(unsigned) * L.nblocks));
            if (L.block_perm == nullptr) {
                pthread_mutex_unlock(&pool.launch_lock);
                snprintf(err, errlen, "kernel '%s': out of memory for the block order", name);
                return 1;
            }
            for (unsigned i = 0; i < L.nblocks; ++i) L.block_perm[i] = i;
            shuffle(L.block_perm, static_cast<unsigned>(L.nblocks), &rng);
        } else {
            // (a*i + c) mod n visits every block once when gcd(a, n) == 1.
            unsigned long long a = splitmix64(&rng) % L.nblocks | 1ull;
            auto gcd = [](unsigned long long x, unsigned long long y) {
                while (y != 0) { const unsigned long long t = x % y; x = y; y = t; }
                return x;
            };
            while (gcd(a, L.nblocks) != 1) a = (a + 2) % L.nblocks;
            L.affine_a = a;
            L.affine_c = splitmix64(&rng) % L.nblocks;
        }
    }

    const unsigned long long cap = configured_workers();
    const unsigned workers = static_cast<unsigned>(L.nblocks < cap ? L.nblocks : cap);
    unsigned helpers = 0;
    if (workers > 1) {
        ensure_pool_threads(workers - 1);
        helpers = pool.threads;
    }
    if (helpers > 0) {
        pthread_mutex_lock(&pool.lock);
        pool.launch = &L;
        pool.running = helpers;
        ++pool.generation;
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_blocks(&pool.workers[0], &L);
    if (helpers > 0) {
        pthread_mutex_lock(&pool.lock);
        while (pool.running > 0) pthread_cond_wait(&pool.done, &pool.lock);
        pool.launch = nullptr;
        pthread_mutex_unlock(&pool.lock);
    }
    free(L.block_perm);
    pthread_mutex_unlock(&pool.launch_lock);
    return L.failed ? 1 : 0;
}

}  // namespace emu
