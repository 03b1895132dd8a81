"""A stand-in for ``nvidia-smi``, run as a real process by the tests.

Usage: ``python testing_fake_nvidia_smi.py SCENARIO LOGFILE [nvidia-smi args...]``; the tests wrap
it in an executable script so the probe sees a plain command. Each call appends its arguments
(one JSON list a line) to LOGFILE. It answers ``--query-gpu=F1,F2 --format=csv,noheader,nounits``
with one CSV line per GPU in the order asked, and a bare call with the usual banner.

Scenarios: ``ok`` (two H100s, the second without temperature and power), ``old-driver`` (a T4
on R470, which does not know ``compute_cap``), ``no-cuda-banner``, ``failing``, ``garbage``,
``bad-number``, ``no-devices``, ``hang``.
"""

from __future__ import annotations

import json
import sys
import time

H100S = [
    {
        "index": "0",
        "uuid": "GPU-5c1a3f3e-8f2b-6d4e-1a2b-3c4d5e6f7a8b",
        "name": "NVIDIA H100 80GB HBM3",
        "memory.total": "81559",
        "driver_version": "550.54.15",
        "compute_cap": "9.0",
        "utilization.gpu": "97",
        "memory.used": "61234",
        "temperature.gpu": "64",
        "power.draw": "512.37",
    },
    {
        "index": "1",
        "uuid": "GPU-0f9e8d7c-6b5a-4938-2716-05f4e3d2c1b0",
        "name": "NVIDIA H100 80GB HBM3",
        "memory.total": "81559",
        "driver_version": "550.54.15",
        "compute_cap": "9.0",
        "utilization.gpu": "0",
        "memory.used": "1",
        "temperature.gpu": "[N/A]",
        "power.draw": "[N/A]",
    },
]

T4S = [
    {
        "index": "0",
        "uuid": "GPU-a1b2c3d4-e5f6-0718-293a-4b5c6d7e8f90",
        "name": "Tesla T4",
        "memory.total": "15109",
        "driver_version": "470.182.03",
        "utilization.gpu": "3",
        "memory.used": "2",
        "temperature.gpu": "41",
        "power.draw": "[Not Supported]",
    }
]

BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  {name}           On  |   00000000:18:00.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""

BANNER_WITHOUT_CUDA = """\
+-----------------------------------------------------------------------------+
| NVIDIA-SMI {driver}    Driver Version: {driver}                              |
+-----------------------------------------------------------------------------+
"""

DRIVER_FAILURE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


def main(scenario: str, logfile: str, args: list[str]) -> int:
    with open(logfile, "a", encoding="utf-8") as log:
        log.write(json.dumps(args) + "\n")
    if scenario == "hang":
        time.sleep(60)
        return 0
    if scenario == "failing":
        sys.stdout.write(DRIVER_FAILURE)
        return 9
    if scenario == "garbage":
        sys.stdout.write("hello world\nthis is not csv at all\n")
        return 0
    if scenario == "no-devices":
        sys.stdout.write("No devices were found\n")
        return 6
    gpus = T4S if scenario == "old-driver" else H100S
    query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
    if query is None:
        return banner(scenario, gpus[0])
    fields = query.split(",")
    if scenario == "old-driver" and "compute_cap" in fields:
        sys.stdout.write('Field "compute_cap" is not a valid field to query.\n\n')
        return 2
    for gpu in gpus:
        values = [gpu[field] for field in fields]
        if scenario == "bad-number" and "utilization.gpu" in fields:
            values[fields.index("utilization.gpu")] = "lots"
        sys.stdout.write(", ".join(values) + "\n")
    return 0


def banner(scenario: str, gpu: dict[str, str]) -> int:
    driver, name = gpu["driver_version"], gpu["name"]
    if scenario == "no-cuda-banner":
        sys.stdout.write(BANNER_WITHOUT_CUDA.format(driver=driver))
    else:
        cuda = "11.4" if scenario == "old-driver" else "12.4"
        sys.stdout.write(BANNER.format(driver=driver, cuda=cuda, name=name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
