"""Instruments cuda/low_latency.cu IN PLACE with per-phase timestamps (a profiling aid for a
throwaway checkout, e.g. the device machine's copy; never commit the result).

    python scripts/ll_phase_trace/instrument.py [REPO_ROOT]
    pip install --no-build-isolation --no-deps .
    python scripts/ll_phase_trace/ll_trace.py NUM_SMS bf16|fp8

Every low-latency kernel then records, per op, the first and last block's %globaltimer at
each phase boundary (entry, count, peers done, announce, rows sent, receive waits done,
receive done, finish, row stores issued, before finish_op, the last block's finalize: the comments of `reps` say where
each point is); block 0 of every 40th op prints the two ops before it
("TRACE r<rank> b<blocks> n<op> (0.1us) ..." relative to the earliest entry; -1: no block
reached that point). The anchors are source lines of low_latency.cu: when one moves, this
script stops with the line it could not find."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
p = os.path.join(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", ".."),
                 "cuda", "low_latency.cu")
s = open(p).read()
hdr = open(os.path.join(HERE, "trace_header.cu")).read()
anch = 'constexpr int kReduceUnroll = 1;  // combine receive: a step loads one vector of every rank\n'
if anch not in s:
    sys.exit("instrument.py: the anchor for the trace helpers is gone; update the script")
s = s.replace(anch, anch + hdr)
reps=[
# dispatch send: 1 positions counted, 2 peers done, 3 counts announced (block 0), 8 a block's
# row stores issued (before its system fence), 4 its slots released
('''  count_positions(a, s_pos, s_total, s_sel);
  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
''','''  count_positions(a, s_pos, s_total, s_sel);
  trace(c.n, 1);
  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  trace(c.n, 2);
'''),
('''        expert_counts_of(g, r, c.parity, me, a.num_experts)[i % num_local] = stamped(c, s_total[i]);
      }
    }
    announce_op(g, c);
''','''        expert_counts_of(g, r, c.parity, me, a.num_experts)[i % num_local] = stamped(c, s_total[i]);
      }
    }
    announce_op(g, c);
    trace(c.n, 3);
'''),
('''  // Every piece of the block's rows is written and made visible: release each (token, rank)
  // slot.
  __threadfence_system();''','''  // Every piece of the block's rows is written and made visible: release each (token, rank)
  // slot.
  __syncthreads();
  trace(c.n, 8);
  __threadfence_system();'''),
('''    if (!(a.mask && is_masked(g, r))) signal(row_flag(dispatch_row(g, r, c.parity, me, t)), c.tag);
  }
''','''    if (!(a.mask && is_masked(g, r))) signal(row_flag(dispatch_row(g, r, c.parity, me, t)), c.tag);
  }
  __syncthreads();
  trace(c.n, 4);
'''),
# dispatch receive: 5 every source's counts seen, 6 copies done
('''  if (s_failed) return;  // finish_op poisons the outputs
''','''  trace(c.n, 5);
  if (s_failed) return;  // finish_op poisons the outputs
'''),
('''      warp_copy_scales(reinterpret_cast<const float*>(row + g.layout.dispatch_scales), a.recv_scales,
                       num_scales, flat, dst_mask, lane);
    }
  }
''','''      warp_copy_scales(reinterpret_cast<const float*>(row + g.layout.dispatch_scales), a.recv_scales,
                       num_scales, flat, dst_mask, lane);
    }
  }
  __syncthreads();
  trace(c.n, 6);
'''),
# combine send: 2 peers done, 3 weights written and announced (block 0), 8 row stores
# issued, 4 rows released; receive: 6 sums done
('''  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  // This block's tokens' weights''','''  if (!wait_peers_done_or_mask(g, c, a.mask)) return;
  trace(c.n, 2);
  // This block's tokens' weights'''),
('''  if (blockIdx.x == 0) announce_op(g, c);
''','''  if (blockIdx.x == 0) announce_op(g, c);
  trace(c.n, 3);
'''),
('''  // Every piece of the block's rows is written and made visible: release each row sent.
  __threadfence_system();''','''  // Every piece of the block's rows is written and made visible: release each row sent.
  __syncthreads();
  trace(c.n, 8);
  __threadfence_system();'''),
('''    if (any) signal(row_flag(combine_row(g, s, c.parity, me, t)), c.tag);
  }
''','''    if (any) signal(row_flag(combine_row(g, s, c.parity, me, t)), c.tag);
  }
  __syncthreads();
  trace(c.n, 4);
'''),
('''                                    static_cast<int4*>(a.out) + at(t, num_vecs, begin), end - begin,
                                    lane);
  }
''','''                                    static_cast<int4*>(a.out) + at(t, num_vecs, begin), end - begin,
                                    lane);
  }
  __syncthreads();
  trace(c.n, 6);
'''),
# every op: 0 entry, 9 before finish_op, 10 the last block in finish_op's finalize, 7 after it
('''  const OpContext c = kSend ? begin_op(g, op) : receive_op(pending, op);
  if (threadIdx.x == 0)''','''  const OpContext c = kSend ? begin_op(g, op) : receive_op(pending, op);
  trace_entry(g, c.n, op);
  if (threadIdx.x == 0)'''),
('''  if (!skip) recv(c);
  finish_op(g, c, poison, [] {}, mask);
}''','''  if (!skip) recv(c);
  trace(c.n, 9);
  finish_op(g, c, poison, [&] { trace(c.n, 10); }, mask);
  trace(c.n, 7);
}'''),
]
for a, b in reps:
    if a not in s:
        sys.exit("instrument.py: this anchor is no longer in cuda/low_latency.cu; update the "
                 "script:\n" + a)
    s = s.replace(a, b)
open(p, "w").write(s)
print(f"instrumented {p}: rebuild (pip install .) and run ll_trace.py")
