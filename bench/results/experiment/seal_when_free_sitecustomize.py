"""EXPERIMENT ONLY, for bench/results/README.md (not part of Darkroom; never imported by it).

Install as ``sitecustomize.py`` in a folder on the PYTHONPATH of the process that starts Ray:

    mkdir -p /tmp/benchpatch && cp bench/results/experiment/seal_when_free_sitecustomize.py \
        /tmp/benchpatch/sitecustomize.py

Then in Ray workers whose env has DARKROOM_SEAL_WHEN_FREE=1,
make @serve.batch seal a batch only when a batch slot is free (Ray 2.60 seals the next batch as
soon as the previous one starts, then makes it wait for the semaphore)."""

import importlib.abc
import importlib.machinery
import os
import sys


def _patch(batching):
    import asyncio
    import time

    from ray import serve

    async def _process_batches(self, func):
        serve.context._unset_request_context()
        while not self._loop.is_closed():
            await self.semaphore.acquire()  # wait for a free slot BEFORE forming the batch
            try:
                batch, _ = await self.wait_for_batch()
            except BaseException:
                self.semaphore.release()
                raise
            sub_batches = self._split_batch_by_model_id(batch)

            async def run(sub_batches=sub_batches):
                try:
                    await asyncio.gather(
                        *[asyncio.create_task(self._process_batch_inner(func, sb)) for sb in sub_batches]
                    )
                finally:
                    self.semaphore.release()

            task = asyncio.create_task(run())
            self.tasks.add(task)
            self.curr_iteration_start_times[task] = time.time()
            task.add_done_callback(self._handle_completed_task)

    batching._BatchQueue._process_batches = _process_batches
    print("darkroom-bench: patched ray.serve.batching (seal when free)", file=sys.stderr, flush=True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "ray.serve.batching":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("DARKROOM_SEAL_WHEN_FREE") == "1":
    sys.meta_path.insert(0, _Finder())
