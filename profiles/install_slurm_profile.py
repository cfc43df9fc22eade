"""Install the `slurm` Snakemake profile (profiles/slurm/*.yaml) where Snakemake looks up
profile names: $XDG_CONFIG_HOME/snakemake/slurm/ (default ~/.config/snakemake/slurm/).

Never overwrites: where `snakemake --profile slurm` already finds a profile (yours, or a
site-wide one in /etc/xdg/snakemake/slurm/), it installs nothing; otherwise it copies only the
files that are missing. It prints what it did. Run by setup.sh; safe to run again.

    .venv/bin/python profiles/install_slurm_profile.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "slurm"
FILES = ("config.yaml", "partitions.yaml")


def existing_profile(name: str = "slurm") -> Path | None:
    """The profile file `snakemake --profile NAME` would use from a directory without a
    ./NAME (the user and the site config directories, as Snakemake searches them)."""
    from snakemake.cli import get_profile_dir
    from snakemake.common import get_appdirs

    dirs = get_appdirs()
    for base in (dirs.user_config_dir, dirs.site_config_dir):
        candidate = Path(base) / name
        if candidate.is_dir():
            found = get_profile_dir(str(candidate))
            if found is not None:
                return found[1]
    return None


def install() -> int:
    from snakemake.common import get_appdirs

    found = existing_profile()
    if found is not None:
        print(f"slurm profile: `snakemake --profile slurm` uses {found}; left as it is "
              f"(the template is {TEMPLATE}/)")
        return 0
    dest = Path(get_appdirs().user_config_dir) / "slurm"
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if target.exists():
            print(f"slurm profile: kept your {target}")
        else:
            shutil.copyfile(TEMPLATE / name, target)
            print(f"slurm profile: installed {target}")
    print(f"slurm profile: edit slurm_account in {dest / 'config.yaml'} and the partition names "
          f"in {dest / 'partitions.yaml'}, then run `snakemake --cores all --profile slurm`")
    return 0


if __name__ == "__main__":
    sys.exit(install())
