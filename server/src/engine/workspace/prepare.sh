set -eu
repo=$1 stage=$2 head=$3 branch=$4 mode=$5 force=$6 name=$7 email=$8 pack=$9
old="$repo.banger-replaced"
done=0 replaced=0
cleanup() {
    if [ "$done" != 1 ]; then
        rm -rf "$repo"
        if [ -e "$old" ]; then mv "$old" "$repo"; fi
    else
        rm -rf "$old"
    fi
    rm -rf "$stage"
}
trap cleanup EXIT
rm -rf "$old"
if [ -e "$repo" ] && [ -n "$(ls -A "$repo" 2>/dev/null)" ]; then
    if [ "$force" != 1 ]; then
        done=1
        echo "banger: $repo already exists and is not empty" >&2
        exit 3
    fi
    mv "$repo" "$old"
    replaced=1
fi
rm -rf "$repo"
mkdir -p "$repo"
cd "$repo"
git init -q
git config advice.detachedHead false
mv "$stage/history.pack" ".git/objects/pack/$pack.pack"
mv "$stage/history.idx" ".git/objects/pack/$pack.idx"
if [ "$(git rev-parse -q --verify "$head^{commit}" || true)" != "$head" ]; then
    echo "banger: the pack does not hold $head" >&2
    exit 1
fi
if [ -n "$branch" ]; then
    git checkout -q -B "$branch" "$head"
else
    git checkout -q --detach "$head"
fi
# Deletions first: a directory the host replaced (by a symlink or a file) must be gone, with any directory
# it leaves empty, before the tar brings what replaced it.
if [ -s "$stage/deleted" ]; then
    xargs -0 rm -f -- < "$stage/deleted"
    xargs -0 dirname -z -- < "$stage/deleted" | sort -zu | grep -zvx . \
        | xargs -0 -r rmdir -p --ignore-fail-on-non-empty -- 2>/dev/null || true
fi
tar -xf "$stage/tree.tar" --no-same-owner -C "$repo"
if [ -n "$name" ]; then git config user.name "$name"; fi
if [ -n "$email" ]; then git config user.email "$email"; fi
idx=$(mktemp)
export GIT_INDEX_FILE="$idx"
git read-tree HEAD
if [ "$mode" = full ]; then
    # Submodule contents were copied as plain files: record them so, not as submodule links.
    git -c core.quotepath=off ls-files -s | grep '^160000' | cut -f2- | while IFS= read -r p; do
        git rm -q --cached -- "$p"
    done
fi
# Only the listed paths are hashed: update-index takes them literally (no pathspec magic), adds what
# exists (--replace: a symlink or file where HEAD has a directory, and the other way round),
# and drops what does not.
# Deleted paths go first, by force: one under a directory the host replaced by a symlink is "beyond a
# symbolic link" for a plain --remove.
if [ -s "$stage/deleted" ]; then
    git update-index --force-remove -z --stdin < "$stage/deleted"
fi
if [ -s "$stage/changed" ]; then
    git update-index --add --remove --replace -z --stdin < "$stage/changed"
fi
tree=$(git write-tree)
unset GIT_INDEX_FILE
rm -f "$idx"
if [ "$tree" = "$(git rev-parse 'HEAD^{tree}')" ]; then
    base=$head
    dirty=0
else
    base=$(git -c user.name="${name:-banger}" -c user.email="${email:-banger@localhost}" \
        commit-tree "$tree" -p HEAD -m "banger: the host working tree copied by workspace prepare")
    dirty=1
fi
git update-ref refs/banger/base "$base"
done=1
printf 'head=%s\nbase=%s\ndirty=%s\nreplaced=%s\n' "$(git rev-parse HEAD)" "$base" "$dirty" "$replaced"
