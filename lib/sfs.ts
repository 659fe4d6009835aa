// SFS, Verda's network disk, outlives the instance; the instance's own disk does not. A step that
// writes under SFS_MOUNT (backup-cron's copies, the models, the restore's image cache copy) or
// reads from it (--from sfs) first checks that SFS_MOUNT is a mount point there: when it is not,
// what it would write would die with the instance, and what it would read is not SFS. It fails
// naming SFS_MOUNT, before anything is written. SFS_MOUNT= (empty) turns the check off.
import fs from 'node:fs';
import path from 'node:path';
import { humanSize } from './cli.ts';
import { datedPattern, localCopies, stampTime } from './dated.ts';
import { program } from './sh.ts';
import type { Host } from './ssh.ts';

/** Whether `p` lies under the mount (or is it), so that the step needs it mounted. */
function underSfs(p: string, sfsMount: string | undefined): sfsMount is string {
  if (!sfsMount) return false;
  const rel = path.relative(sfsMount, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

class SfsNotMounted extends Error {}

/**
 * Throws, naming SFS_MOUNT, when `p` lies under it and it is not a mount point on the host.
 * `what` says what the step was about to do there.
 */
export async function requireSfs(
  host: Host,
  sfsMount: string | undefined,
  p: string,
  what: string,
  signal?: AbortSignal,
): Promise<void> {
  if (!underSfs(p, sfsMount)) return;
  const r = await host.$({ signal, nothrow: true })`sh -c ${program('is-mount-point')} is-mount-point ${sfsMount}`;
  if (r.code === 0) return;
  const state = r.code === 2 ? 'does not exist' : 'is not a mount point';
  throw new SfsNotMounted(
    `SFS_MOUNT ${sfsMount} ${state} on ${host.label} (SFS not mounted?): ${what} ${p} refused, ` +
      `so nothing lands on the instance's own disk (mount SFS, or set SFS_MOUNT= where there is no SFS)`,
  );
}

/** --list of backup-cron: the dated copies of each kind in a directory (SFS), newest first. */
export function listCopies(dir: string, kinds: string[], json: boolean): string {
  const copies = kinds.map((kind) => ({
    kind,
    copies: localCopies(dir, kind, 'tar.gz').map((name) => ({
      name,
      time: stampTime(datedPattern(kind, 'tar.gz').exec(name)![1]).toISOString(),
      bytes: fs.lstatSync(path.join(dir, name), { throwIfNoEntry: false })?.size ?? 0,
    })),
  }));
  if (json) return JSON.stringify({ dir, kinds: copies }, null, 2) + '\n';
  const lines = [`Copies in ${dir}, newest first:`];
  for (const k of copies) {
    lines.push(`  ${k.kind}:${k.copies.length ? '' : ' none'}`);
    for (const c of k.copies) lines.push(`    ${c.name}  ${humanSize(c.bytes)}`);
  }
  lines.push('', 'Restore them with: restore-verda.mts --from sfs (the newest of each kind)');
  return lines.join('\n') + '\n';
}
