"""Check that the installed torch and transformers load together (and, given a lock file, that
every locked package is at its locked version). Run at the end of `make install`; exits 1 with
one clear line per problem, so a broken environment fails at install time, not at the first import.

torchaudio is no runtime dependency (data/audio.py has its own resampler); it is installed with
the `test` extra for the test that compares the two resamplers. Where it is installed it is
checked too (a torchaudio built for another torch release fails at import): an error against a
lock file, a note otherwise, since no torchaudio release may match the torch a user has.

    python scripts/check_install.py [requirements.lock]
"""

import importlib
import importlib.metadata
import sys

PACKAGES = ("torch", "transformers")
OPTIONAL = ("torchaudio",)  # checked where installed


def locked_versions(path):
    pins = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def main(argv):
    problems = []
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    present = list(PACKAGES) + [n for n in OPTIONAL if n in installed]
    for name in list(present):
        try:
            importlib.import_module(name)
        except Exception as e:  # an import of a mismatched build fails with OSError, ImportError, ...
            why = f"{name} does not import: {type(e).__name__}: {str(e).splitlines()[0]}"
            if name in PACKAGES or len(argv) > 1:  # a locked set must load whole
                problems.append(why)
            else:  # no release of it may match this torch: only its test is skipped
                print(f"install check: note: {why} (the tests that use it are skipped)", file=sys.stderr)
                present.remove(name)
    if len(argv) > 1:
        pins = locked_versions(argv[1])
        for dist in importlib.metadata.distributions():
            name = dist.metadata["Name"].lower().replace("_", "-")
            if name in pins and dist.version != pins[name]:
                problems.append(f"{name} {dist.version} is installed but {argv[1]} locks {pins[name]}")
    if problems:
        print("install check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        print("reinstall with 'make clean install' (it installs the versions in requirements.lock); "
              "a torchaudio must be a build for the installed torch release", file=sys.stderr)
        return 1
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in present)
    print(f"install check: {versions} load together")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
