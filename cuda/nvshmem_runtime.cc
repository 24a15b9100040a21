// NVSHMEM initialisation and the internode group registry (cuda/nvshmem_runtime.h).
#include "cuda/nvshmem_runtime.h"

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace jax_ep {
namespace {

std::mutex g_mutex;
std::map<int64_t, std::shared_ptr<InternodeGroup>> g_groups;
bool g_initialized_here = false;
int g_ordinal = -1;  // the CUDA device of this process's PE, once initialised here

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("jax_ep internode: ") + what + " failed: " +
                             cudaGetErrorString(err) + ".");
  }
}

const char* op_name(int op) {
  switch (op) {
    case kOpDispatch: return "internode dispatch";
    case kOpCombine: return "internode combine";
    case kOpCachedDispatch: return "internode cached dispatch (combine's backward)";
    case kOpLowLatencyDispatch: return "internode low-latency dispatch";
    case kOpLowLatencyCombine: return "internode low-latency combine";
    default: return "internode operation";
  }
}

// The group of buffer_id, which must exist (for the host's queries from Python).
std::shared_ptr<const InternodeGroup> found_internode_group(int64_t buffer_id) {
  auto group = find_internode_group(buffer_id);
  if (group == nullptr) {
    throw std::invalid_argument("jax_ep internode: Buffer " + std::to_string(buffer_id) +
                                " has no internode group in this process.");
  }
  return group;
}

}  // namespace

std::string nvshmem_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) {
    throw std::runtime_error("jax_ep internode: nvshmemx_get_uniqueid failed; check that "
                             "NVSHMEM's bootstrap can open a socket (NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME "
                             "names the network interface to use).");
  }
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

std::string nvshmem_state() {
  const int status = nvshmemx_init_status();
  if (status < NVSHMEM_STATUS_IS_INITIALIZED) return "not initialized";
  return g_initialized_here ? "initialized by jax_ep" : "initialized by another component";
}

void nvshmem_initialize(int pe, int num_pes, const std::string& unique_id, int ordinal) {
  std::lock_guard<std::mutex> lock(g_mutex);
  check_cuda(cudaSetDevice(ordinal), "cudaSetDevice");
  if (nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED) {
    if (nvshmem_my_pe() != pe || nvshmem_n_pes() != num_pes) {
      throw std::runtime_error(
          "jax_ep internode: NVSHMEM is already initialised in this process as PE " +
          std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes()) +
          ", but jax_ep needs PE " + std::to_string(pe) + " of " + std::to_string(num_pes) +
          " (one per process of the mesh). Do not enable XLA's own NVSHMEM "
          "(--xla_gpu_experimental_enable_nvshmem) with a different process layout.");
    }
    return;
  }
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::invalid_argument("jax_ep internode: the unique id has " +
                                std::to_string(unique_id.size()) + " bytes; pass the " +
                                std::to_string(sizeof(nvshmemx_uniqueid_t)) +
                                " bytes nvshmem_unique_id() returned on PE 0.");
  }
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(pe, num_pes, &id, &attr) != 0) {
    throw std::runtime_error("jax_ep internode: nvshmemx_set_attr_uniqueid_args failed.");
  }
  // nvshmemx_init_attr would exit() the process on failure; call what it calls instead.
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  const int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided,
                                          NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (status != 0) {
    throw std::runtime_error(
        "jax_ep internode: NVSHMEM initialisation failed (status " + std::to_string(status) +
        ") on PE " + std::to_string(pe) + " of " + std::to_string(num_pes) +
        ". NVSHMEM_DEBUG=INFO prints why; NVSHMEM_SYMMETRIC_SIZE must fit in GPU memory next "
        "to JAX's pool (lower XLA_PYTHON_CLIENT_MEM_FRACTION).");
  }
  g_initialized_here = true;
  g_ordinal = ordinal;
}

bool nvshmem_finalize_here() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_initialized_here) return false;
  if (!g_groups.empty()) {
    throw std::logic_error("jax_ep internode: " + std::to_string(g_groups.size()) +
                           " internode Buffer(s) still open; close them before finalising "
                           "NVSHMEM.");
  }
  check_cuda(cudaSetDevice(g_ordinal), "cudaSetDevice");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  nvshmem_finalize();  // collective: every PE
  g_initialized_here = false;
  return true;
}

void create_internode_group(int64_t buffer_id, int ordinal, int rank, int num_ranks,
                            int ranks_per_node, const std::vector<int>& pes, int max_tokens,
                            int ll_max_tokens, int hidden, int max_topk, int num_experts,
                            double timeout_s, bool puts_only) {
  if (nvshmemx_init_status() < NVSHMEM_STATUS_IS_INITIALIZED) {
    throw std::invalid_argument("jax_ep internode: NVSHMEM is not initialised; call "
                                "nvshmem_initialize first.");
  }
  if (num_ranks < 2 || num_ranks > kMaxInternodeRanks || ranks_per_node < 1 ||
      ranks_per_node > kMaxNvlRanks || num_ranks % ranks_per_node != 0 ||
      num_ranks / ranks_per_node > kMaxNodes) {
    throw std::invalid_argument(
        "jax_ep internode: " + std::to_string(num_ranks) + " ranks with " +
        std::to_string(ranks_per_node) + " per node is not supported: at most " +
        std::to_string(kMaxInternodeRanks) + " ranks, " + std::to_string(kMaxNvlRanks) +
        " per node, " + std::to_string(kMaxNodes) + " nodes, and the ranks per node divide the ranks.");
  }
  if (static_cast<int>(pes.size()) != num_ranks || rank < 0 || rank >= num_ranks ||
      pes[rank] != nvshmem_my_pe()) {
    throw std::invalid_argument("jax_ep internode: pes must list the PE of each of the " +
                                std::to_string(num_ranks) + " ranks, with this process's PE (" +
                                std::to_string(nvshmem_my_pe()) + ") at its rank " +
                                std::to_string(rank) + ".");
  }
  if (num_experts % num_ranks != 0 || num_experts > kMaxExperts || max_topk > 16 ||
      hidden % 128 != 0 || max_tokens < 1 || ll_max_tokens < 0 || ll_max_tokens > max_tokens) {
    throw std::invalid_argument("jax_ep internode: unsupported sizes (num_experts a multiple of "
                                "the ranks and at most 1024, max_topk <= 16, hidden a multiple "
                                "of 128, max_tokens >= 1, 0 <= ll_max_tokens <= max_tokens).");
  }
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_groups.count(buffer_id)) {
      throw std::invalid_argument("jax_ep internode: Buffer " + std::to_string(buffer_id) +
                                  " already has an internode group in this process.");
    }
  }
  auto group = std::make_shared<InternodeGroup>();
  group->buffer_id = buffer_id;
  group->ordinal = ordinal;
  group->timeout_s = timeout_s;
  group->max_tokens = max_tokens;
  group->ll_max_tokens = ll_max_tokens;
  group->hidden = hidden;
  group->max_topk = max_topk;
  group->num_experts = num_experts;
  check_cuda(cudaSetDevice(ordinal), "cudaSetDevice");
  check_cuda(cudaDeviceGetAttribute(&group->num_sms_on_device, cudaDevAttrMultiProcessorCount, ordinal),
             "cudaDeviceGetAttribute");
  const InternodeLayout layout =
      make_internode_layout(num_ranks, ranks_per_node, max_tokens, hidden, max_topk, num_experts);
  // Collective: every PE allocates the same size, in the same order.
  group->base = static_cast<char*>(nvshmem_malloc(layout.total));
  if (group->base == nullptr) {
    throw std::runtime_error(
        "jax_ep internode: nvshmem_malloc of " + std::to_string(layout.total >> 20) +
        " MiB failed. Set NVSHMEM_SYMMETRIC_SIZE (bytes) before the first internode Buffer to "
        "at least the sum of the regions of every Buffer (jax_ep.internode_region_bytes), or "
        "lower max_tokens_per_rank.");
  }
  // The low-latency staging: a second symmetric allocation (collective, same order everywhere),
  // sized by ll_max_tokens; none when it is 0 (the same in every process: checked in Python).
  if (ll_max_tokens > 0) {
    const InternodeLowLatencyLayout ll_layout = make_internode_low_latency_layout(
        num_ranks, ranks_per_node, ll_max_tokens, hidden, max_topk, num_experts);
    group->ll_base = static_cast<char*>(nvshmem_malloc(ll_layout.total));
    if (group->ll_base == nullptr) {
      nvshmem_free(group->base);
      throw std::runtime_error(
          "jax_ep internode: nvshmem_malloc of the low-latency staging (" +
          std::to_string(ll_layout.total >> 20) + " MiB) failed. Set NVSHMEM_SYMMETRIC_SIZE (bytes) "
          "before the first internode Buffer to at least the sum of the regions of every Buffer, "
          "or lower low_latency_max_tokens_per_rank (0: a Buffer that runs no low-latency ops).");
    }
    group->ll_view.base = group->ll_base;
    group->ll_view.layout = ll_layout;
    check_cuda(cudaMemset(group->ll_base, 0, ll_layout.total), "zeroing the low-latency staging");
  }
  check_cuda(cudaMemset(group->base, 0, layout.total), "zeroing the region");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&group->error), sizeof(ErrorRecord),
                           cudaHostAllocMapped), "cudaHostAlloc");
  std::memset(group->error, 0, sizeof(ErrorRecord));
  InternodeView& v = group->view;
  v.base = group->base;
  v.layout = layout;
  v.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  v.rank = rank;
  v.num_ranks = num_ranks;
  v.ranks_per_node = ranks_per_node;
  v.num_nodes = num_ranks / ranks_per_node;
  v.node = rank / ranks_per_node;
  v.local = rank % ranks_per_node;
  v.max_tokens = max_tokens;
  v.hidden = hidden;
  v.max_topk = max_topk;
  v.num_experts = num_experts;
  for (int r = 0; r < num_ranks; ++r) v.pe[r] = pes[r];
  for (int g = 0; g < ranks_per_node; ++g) {
    const int peer = v.node * ranks_per_node + g;
    v.nvl_base[g] = static_cast<char*>(nvshmem_ptr(group->base, pes[peer]));
    bool mapped = v.nvl_base[g] != nullptr;
    if (group->ll_base != nullptr) {
      group->ll_view.nvl_base[g] = static_cast<char*>(nvshmem_ptr(group->ll_base, pes[peer]));
      mapped = mapped && group->ll_view.nvl_base[g] != nullptr;
    }
    if (!mapped) {
      if (group->ll_base != nullptr) nvshmem_free(group->ll_base);
      nvshmem_free(group->base);
      cudaFreeHost(group->error);
      throw std::invalid_argument(
          "jax_ep internode: EP rank " + std::to_string(peer) + " (PE " + std::to_string(pes[peer]) +
          ") is in the node of rank " + std::to_string(rank) + " but NVSHMEM cannot map its memory "
          "(no NVLink/P2P path): num_ranks_per_node=" + std::to_string(ranks_per_node) +
          " must group GPUs of one host.");
    }
  }
  for (int m = 0; m < v.num_nodes; ++m) {
    v.forwarder_base[m] = m == v.node ? group->base
                          : puts_only ? nullptr
                                      : static_cast<char*>(nvshmem_ptr(group->base, pes[m * ranks_per_node + v.local]));
  }
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&v.error), group->error, 0),
             "cudaHostGetDevicePointer");
  // Nobody writes into a peer's region before the peer zeroed it.
  nvshmem_barrier_all();
  std::lock_guard<std::mutex> lock(g_mutex);
  g_groups[buffer_id] = group;
}

void destroy_internode_group(int64_t buffer_id, bool free_region) {
  std::shared_ptr<InternodeGroup> group;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_groups.find(buffer_id);
    if (it == g_groups.end()) {
      throw std::invalid_argument("jax_ep internode: Buffer " + std::to_string(buffer_id) +
                                  " has no internode group in this process.");
    }
    group = it->second;
    g_groups.erase(it);
  }
  group->closed.store(true, std::memory_order_release);
  cudaSetDevice(group->ordinal);
  cudaDeviceSynchronize();  // a kernel waiting for a dead peer ends after timeout_s
  if (free_region) {
    // Collective: waits for every PE (each has the same allocations).
    if (group->ll_base != nullptr) nvshmem_free(group->ll_base);
    nvshmem_free(group->base);
  }
  cudaFreeHost(group->error);
  group->ll_base = nullptr;
  group->base = nullptr;
  group->error = nullptr;
}

std::shared_ptr<const InternodeGroup> find_internode_group(int64_t buffer_id) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_groups.find(buffer_id);
  return it == g_groups.end() ? nullptr : it->second;
}

std::string InternodeGroup::error_message() const {
  if (error == nullptr || error->flag == 0) return "";
  const std::string where = std::string("the ") + op_name(error->op) + " (operation #" +
                            std::to_string(error->op_number) + " of Buffer " +
                            std::to_string(buffer_id) + ") on EP rank " +
                            std::to_string(view.rank);
  std::string what;
  if (error->kind == kFailOrder) {
    const unsigned long long seen = error->seen_tag;
    what = where + " found that EP rank " + std::to_string(error->peer) + " ran a " +
           op_name(static_cast<int>(seen & ((1u << kOpBits) - 1))) + " as operation #" +
           std::to_string(seen >> kOpBits) +
           ". Every rank must run the same sequence of jax_ep operations.";
  } else if (error->kind == kFailInFlight) {
    const unsigned long long seen = error->seen_tag;
    what = where + " was given the pending value of operation #" +
           std::to_string(seen >> kOpBits) + " (a " +
           op_name(static_cast<int>(seen & ((1u << kOpBits) - 1))) +
           "): receive each hooked send exactly once, right after it, with no other jax_ep "
           "operation of the Buffer in between.";
  } else {
    what = where + " waited more than " + std::to_string(timeout_s) + " s for EP rank " +
           std::to_string(error->peer) +
           ". Every rank must run the same sequence of jax_ep operations; raise timeout_s if a "
           "peer can be that late (e.g. a slow first compile).";
  }
  return what + " The Buffer is unusable now: close it (in every process) and create a new one.";
}

std::string internode_take_error(int64_t buffer_id) {
  return found_internode_group(buffer_id)->error_message();
}

std::vector<InternodeMaskedRank> internode_masked_ranks(int64_t buffer_id) {
  auto group = found_internode_group(buffer_id);
  const ErrorRecord& e = *group->error;
  std::vector<InternodeMaskedRank> out;
  for (int peer = 0; peer < group->view.num_ranks; ++peer) {
    if (e.masked[peer] != 0) {
      out.push_back({group->view.rank, peer, op_name(e.mask_op), e.mask_op_number});
    }
  }
  return out;
}

}  // namespace jax_ep
