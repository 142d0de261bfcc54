"""What a page-lock in one thread costs the others, and what splitting it changes.

``python -m benchmarks.gpu_pin_probe`` (a CUDA machine). The GPU run of the loop-lag probe
(``benchmarks.gpu_lag_probe``) found event-loop steps blocked for exactly as long as a
``cudaHostRegister`` ran in a worker thread, while a plain thread's heartbeat (which needs only
the GIL) was on time. This probe asks, on the machine at hand:

1. which calls in the main thread wait for a registration running in another thread: a pure
   Python loop (the GIL), allocating and freeing 64 MiB (``mmap``/``munmap``), touching fresh
   pages (page faults), starting a thread, polling and recording a CUDA event;
2. how long registering 64 MiB takes in one piece and in 2 and 4 MiB pieces;
3. whether a device-to-host copy into memory registered in pieces runs at the pinned speed
   (one copy spanning the pieces, and one copy per piece), against one registration and none.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

MiB = 1 << 20


def _register(ptr: int, nbytes: int) -> None:
    code = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister: CUDA error {code}")


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _register_pieces(buffer: torch.Tensor, piece: int) -> list[int]:
    base, nbytes = buffer.data_ptr(), buffer.numel()
    ptrs = []
    for offset in range(0, nbytes, piece):
        _register(base + offset, min(piece, nbytes - offset))
        ptrs.append(base + offset)
    return ptrs


def _fresh(nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    buffer.fill_(1)  # touched: registering then measures the pinning, not first faults
    return buffer


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms"


def contention(rounds: int = 8, nbytes: int = 64 * MiB) -> None:
    """Main-thread calls timed while another thread registers ``nbytes`` in one piece."""
    event = torch.cuda.Event()
    event.record()
    torch.cuda.synchronize()

    def spin() -> None:
        deadline = time.perf_counter() + 0.0005
        while time.perf_counter() < deadline:
            pass

    def alloc_free() -> None:
        # Over glibc's largest mmap threshold (32 MiB): an mmap and an munmap every time.
        torch.empty(64 * MiB, dtype=torch.uint8)

    def touch() -> None:
        torch.empty(64 * MiB, dtype=torch.uint8).fill_(0)  # 16,384 page faults

    def start_thread() -> None:
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()

    probes: dict[str, Callable[[], object]] = {
        "pure Python 0.5 ms spin": spin,
        "torch.empty(64 MiB) and free": alloc_free,
        "touch 64 MiB of fresh pages": touch,
        "start and join a thread": start_thread,
        "cuda event query": event.query,
        "cuda event record": event.record,
    }
    for name, probe in probes.items():
        quiet, busy, registers = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            probe()
            quiet.append(time.perf_counter() - started)
            buffer = _fresh(nbytes)
            began = threading.Event()
            spans: list[float] = []

            def pin(
                buffer: torch.Tensor = buffer,
                began: threading.Event = began,
                spans: list[float] = spans,
            ) -> None:
                began.set()
                t0 = time.perf_counter()
                _register(buffer.data_ptr(), buffer.numel())
                spans.append(time.perf_counter() - t0)

            worker = threading.Thread(target=pin)
            worker.start()
            began.wait()
            time.sleep(0.0005)  # the registration under way
            started = time.perf_counter()
            probe()
            busy.append(time.perf_counter() - started)
            worker.join()
            registers.append(spans[0])
            _unregister(buffer.data_ptr())
        print(
            f"  {name:32s} quiet median {_ms(statistics.median(quiet))}, during a "
            f"{_ms(statistics.median(registers))} register: median "
            f"{_ms(statistics.median(busy))}, max {_ms(max(busy))}"
        )


def pieces(nbytes: int = 64 * MiB) -> None:
    """Registration time by piece size; copy speed into pieces."""
    source = torch.randn(nbytes // 4, device="cuda")
    torch.cuda.synchronize()
    for piece in (nbytes, 4 * MiB, 2 * MiB):
        buffer = _fresh(nbytes)
        t0 = time.perf_counter()
        ptrs = _register_pieces(buffer, piece)
        took = time.perf_counter() - t0
        print(f"  register {nbytes // MiB} MiB in {len(ptrs)} piece(s): {_ms(took)}")
        for ptr in ptrs:
            _unregister(ptr)

    def copy_time(buffer: torch.Tensor, split: int | None) -> tuple[float, float]:
        dst = buffer.view(torch.float32)
        times, returns = [], []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if split is None:
                dst.copy_(source, non_blocking=True)
            else:
                step = split // 4
                for start in range(0, dst.numel(), step):
                    dst[start : start + step].copy_(source[start : start + step], non_blocking=True)
            returned = time.perf_counter() - t0
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            returns.append(returned)
        return statistics.median(times), statistics.median(returns)

    layouts: list[tuple[str, int | None, int | None]] = [
        ("not registered", None, None),
        ("one registration", nbytes, None),
        ("4 MiB pieces, one copy", 4 * MiB, None),
        ("4 MiB pieces, a copy per piece", 4 * MiB, 4 * MiB),
        ("2 MiB pieces, one copy", 2 * MiB, None),
    ]
    for label, registered_in, split in layouts:
        buffer = _fresh(nbytes)
        ptrs = _register_pieces(buffer, registered_in) if registered_in else []
        try:
            took, returned = copy_time(buffer, split)
        except RuntimeError as error:  # a copy across two registrations: CUDA refuses it
            print(f"  D2H {nbytes // MiB} MiB, {label:32s}: failed: {str(error).splitlines()[0]}")
            for ptr in ptrs:
                _unregister(ptr)
            continue
        print(
            f"  D2H {nbytes // MiB} MiB, {label:32s}: {_ms(took)} "
            f"({nbytes / took / 1e9:.1f} GB/s), the call returned after {_ms(returned)}"
        )
        for ptr in ptrs:
            _unregister(ptr)


def gil_churn(count: int = 20_000) -> None:
    """Per-op cost of a cheap torch op (``view``) in one thread, alone and beside another."""
    tensors = [torch.zeros(4, device="cuda") for _ in range(count)]

    def views() -> float:
        t0 = time.perf_counter()
        for t in tensors:
            t.view(torch.uint8)
        return (time.perf_counter() - t0) / count

    alone = views()
    other = threading.Thread(target=views)
    other.start()
    beside = views()
    other.join()
    print(f"  view(): {1e6 * alone:.2f} us alone, {1e6 * beside:.2f} us beside a thread doing it")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return 0
    torch.cuda.init()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("1. main-thread calls during a 64 MiB cudaHostRegister in another thread")
    contention()
    print("4. GIL churn")
    gil_churn()
    print("2-3. registering and copying in pieces")
    pieces()
    return 0


if __name__ == "__main__":
    sys.exit(main())
