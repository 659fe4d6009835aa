// The worker image on a restored Verda: nothing to do when the image ID the backup recorded is
// loaded; else the SFS cache copy when its sha256 is the recorded one, else Mello's copy streamed
// over the connection, else the cache bucket's object relayed through Mello (Verda never holds a
// key to that bucket). A copy that arrives is written on SFS under a temporary name, checked
// there against the recorded sha256, then renamed: it is the cache copy the next instance loads.
import path from 'node:path';
import type { Readable } from 'node:stream';
import { IMAGE_FILE } from './archive.ts';
import { errorText, humanSize } from './cli.ts';
import { openRegular } from './files.ts';
import type { Step, StepResult } from './plan.ts';
import { IMAGE_KIND, shortId, type RestoreSource } from './restore.ts';
import type { Host } from './ssh.ts';
import type { Backend } from './storage.ts';

// The image's ID there; 127 when the CLI is missing, 3 when no such image is loaded.
const INSPECT = `command -v "$1" >/dev/null 2>&1 || exit 127
"$1" image inspect --format '{{.Id}}' "$2" 2>/dev/null || exit 3`;

// sha256 of the file $1, or exit 3 when it is not there.
const SHA256 = `[ -f "$1" ] && [ ! -L "$1" ] || exit 3
exec sha256sum -- "$1"`;

// Stores stdin as $1/$2 through a temporary name, created exclusively; read back from disk and
// renamed only when its sha256 is $3. The temporary file goes whatever happens.
const STORE = `set -e
dir=$1 name=$2 want=$3
mkdir -p -- "$dir"
tmp=$dir/.$name.partial-$$
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
set -C
cat > "$tmp"
set +C
sync -- "$tmp"
got=$(sha256sum -- "$tmp")
got=\${got%% *}
if [ "$got" != "$want" ]; then echo "the bytes received have sha256 $got, not $want" >&2; exit 3; fi
mv -f -- "$tmp" "$dir/$name"
trap - EXIT`;

// docker load reads gzip itself, Debian's podman 4.3 cannot (a gzipped docker-archive fails with
// "unexpected EOF"): the archive is decompressed for both. Its sha256 was checked first.
const LOAD = 'gzip -dc -- "$1" | "$2" load';

const sameId = (a: string, b: string) => a.replace(/^sha256:/, '') === b.replace(/^sha256:/, '');

export interface ImageRestoreOptions {
  host: Host;
  cli: string;
  image: string;
  source: RestoreSource;
  /** Where Verda keeps its cache copy (SFS_BACKUP_DIR, under --root if given). */
  cacheDir: string;
  /** The cache bucket, the last place the image is read from. */
  cache?: () => Backend;
  skipReason?: string;
}

export function imageRestoreStep(o: ImageRestoreOptions): Step {
  const sfsCopy = path.join(o.cacheDir, IMAGE_FILE);
  return {
    name: 'Worker image',
    moves: `${o.host.label}: ${o.cli} load ${o.image}, from ${sfsCopy}, else Mello's ${IMAGE_FILE}, else R2`,
    skipReason: o.skipReason,
    async run(ctx): Promise<StepResult> {
      if (!o.source.checked)
        return { status: 'skipped', summary: 'not restored: the backup did not check out (step 1)' };
      const want = o.source.image;
      if (!want)
        return {
          status: 'skipped',
          summary: 'nothing to restore',
          warnings: [o.source.absent.get(IMAGE_KIND) ?? 'no image recorded'],
        };
      const short = shortId(want.imageId);
      const loaded = async () => {
        const r = await o.host.run(['sh', '-c', INSPECT, 'sh', o.cli, o.image], { signal: ctx.signal });
        if (r.code === 127) throw new Error(`${o.cli} (CONTAINER_CLI) is not installed on ${o.host.label}`);
        return r.code === 0 ? r.stdout.trim() : undefined;
      };
      const before = await loaded();
      if (before && sameId(before, want.imageId)) return { summary: `image ${short} already loaded: nothing to do` };

      const sfs = await o.host.run(['sh', '-c', SHA256, 'sh', sfsCopy], { signal: ctx.signal });
      const sfsHolds = sfs.code === 0 && sfs.stdout.split(' ')[0] === want.sha256;
      const relay = async () => {
        const cache = o.cache?.();
        const head = await cache?.head(IMAGE_FILE, ctx.signal);
        return cache && head?.metadata.sha256 === want.sha256 && head.size === want.bytes ? cache : undefined;
      };
      if (ctx.dryRun) {
        const from = sfsHolds
          ? sfsCopy
          : want.melloFile
            ? `Mello's ${want.melloFile}`
            : (await relay())
              ? `${o.cache!().name}/${IMAGE_FILE}`
              : undefined;
        if (!from) throw new Error(`no copy of image ${short} (${want.recordedIn}) on SFS, on Mello or in R2`);
        return { summary: `would load image ${short} (${humanSize(want.bytes)}) from ${from} with ${o.cli} load` };
      }

      const warnings: string[] = [];
      let from = sfsCopy;
      let bytes = 0;
      if (!sfsHolds) {
        if (sfs.code === 0) warnings.push(`${sfsCopy} is not image ${short}: replaced`);
        // Mello's copy, else R2's: each sent into the SFS cache copy and checked there.
        const tried: string[] = [];
        const store = async (stream: Readable, label: string) => {
          const r = await o.host.run(['sh', '-c', STORE, 'sh', o.cacheDir, IMAGE_FILE, want.sha256], {
            stdin: stream,
            signal: ctx.signal,
          });
          if (r.code !== 0) throw new Error(r.stderr.trim().split('\n').slice(-2).join('; ') || `exit ${r.code}`);
          from = label;
          bytes = want.bytes;
        };
        if (want.melloFile) {
          const { handle } = await openRegular(want.melloFile);
          await store(handle.createReadStream({ highWaterMark: 1 << 20 }), `Mello's ${IMAGE_FILE}`).catch((e) => {
            if (ctx.signal.aborted) throw e;
            tried.push(`Mello's copy: ${errorText(e)}`);
          });
        }
        if (!bytes) {
          const cache = await relay();
          if (cache) {
            await store(await cache.get(IMAGE_FILE, ctx.signal), `${cache.name}/${IMAGE_FILE}`).catch((e) => {
              if (ctx.signal.aborted) throw e;
              tried.push(`${cache.name}/${IMAGE_FILE}: ${errorText(e)}`);
            });
          } else
            tried.push(
              `${o.cache ? `the cache bucket's ${IMAGE_FILE} is another image or missing` : 'no cache bucket'}`,
            );
        }
        if (!bytes)
          throw new Error(
            `image ${short} (${want.recordedIn}) not loaded: no copy of it could be had (${tried.join('; ')})`,
          );
      }
      const load = await o.host.run(['sh', '-c', LOAD, 'sh', sfsCopy, o.cli], { signal: ctx.signal });
      if (load.code !== 0) {
        throw new Error(
          `${o.cli} load on ${o.host.label} failed (exit ${load.code}): ` +
            load.stderr.trim().split('\n').slice(-2).join('; '),
        );
      }
      const after = await loaded();
      if (!after || !sameId(after, want.imageId)) {
        throw new Error(
          `${o.cli} load gave ${o.image} the ID ${after ? shortId(after) : '(none)'}, ` +
            `not ${short} as ${want.recordedIn} records`,
        );
      }
      const kept = from === sfsCopy ? '' : `; kept as ${sfsCopy}`;
      return { summary: `image ${short} (${humanSize(want.bytes)}) loaded from ${from}${kept}`, bytes, warnings };
    },
  };
}
