set -u
repo=$1 stage=$2 was_empty=$3
old="$repo.banger-replaced"
if [ -e "$old" ]; then
    rm -rf "$repo"
    mv "$old" "$repo"
elif [ "$was_empty" = 1 ]; then
    rm -rf "$repo"
fi
rm -rf "$stage"
