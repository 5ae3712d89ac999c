set -eu
repo=$1 base=$2 out=$3
if ! cd "$repo" 2>/dev/null || [ "$(git rev-parse --show-toplevel 2>/dev/null)" != "$(pwd -P)" ]; then
    echo "banger: $repo is not a git repository" >&2
    exit 3
fi
if ! basec=$(git rev-parse -q --verify "$base^{commit}"); then
    echo "banger: $base is not a commit in $repo" >&2
    exit 4
fi
head=$(git rev-parse -q --verify HEAD || true)
mkdir -p "$(dirname "$out")"
idx=$(mktemp)
trap 'rm -f "$idx" "$out.tmp"' EXIT
# A copy of the agent's index (keeps files it force-added), so its own staging is never disturbed.
if ! cp "$(git rev-parse --git-path index)" "$idx" 2>/dev/null; then
    rm -f "$idx"
    GIT_INDEX_FILE="$idx" git read-tree --empty
fi
export GIT_INDEX_FILE="$idx"
# Where the base holds plain files at a submodule link (full-mode prepare), compare plain files.
git -c core.quotepath=off ls-files -s | grep '^160000' | cut -f2- | while IFS= read -r p; do
    if [ "$(git cat-file -t "$basec:$p" 2>/dev/null)" = tree ]; then git rm -q --cached -- "$p"; fi
done
git add -A
git -c core.quotepath=off diff --cached --binary --full-index --no-color --no-ext-diff --no-textconv -M \
    "$basec" > "$out.tmp"
git diff --cached --name-status -z --no-ext-diff -M "$basec" > "$out.files"
git ls-files -z --others --ignored --exclude-standard --directory > "$out.ignored"
mv "$out.tmp" "$out"
printf 'base=%s\nhead=%s\n' "$basec" "$head"
