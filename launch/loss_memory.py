"""The causal-LM loss alone compiled for a TPU slice (libtpu, on a CPU host): per-chip memory of the
plain loss against the vocabulary-chunked one (README, "Fused attention and the chunked loss").

    JAX_PLATFORMS=cpu python launch/loss_memory.py 0 512     # loss_chunk values; 0 = plain
"""
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from bigmodel import topology
from bigmodel.config import MeshConfig
from bigmodel.objectives import lm
devs = topology.topology_devices(topology.parse("v5e-8"))
mesh = topology.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devs)
b, s, d, v = 8, 4096, 2048, 128256
rows = NamedSharding(mesh, P(("data", "fsdp")))
h = jax.ShapeDtypeStruct((b, s, d), jnp.bfloat16, sharding=rows)
t = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=rows)
w = jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
for chunk in map(int, sys.argv[1:]):
  def loss(h, w, t):
    head = lambda x: jnp.einsum("bsd,dv->bsv", x, w.astype(jnp.bfloat16)).astype(jnp.float32)
    wt = jnp.ones(t.shape, jnp.float32)
    sums = lm.chunked_cross_entropy(head, h, t, wt, chunk) if chunk else lm.cross_entropy(head(h), t, wt)
    return sums[0]
  t0 = time.time()
  c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, t).compile()
  m = c.memory_analysis()
  print(f"chunk {chunk}: temporaries {m.temp_size_in_bytes / 2**30:.3f} GiB, arguments {m.argument_size_in_bytes / 2**30:.3f} GiB, "
        f"outputs {m.output_size_in_bytes / 2**30:.3f} GiB, compile {time.time() - t0:.0f} s", flush=True)
