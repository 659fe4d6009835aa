// One run per script at a time. The lock is a file created whole and exclusively (written under
// a temporary name, then hard-linked into place), recording who holds it: host, boot, pid, the
// process's start time and the script. A lock is stale, and taken over, when its process is gone,
// when the pid now belongs to another process (pid reuse after a crash or reboot), or when it was
// taken in an earlier boot. A lock from another host (shared storage) is its holder's until its
// heartbeat, the file's mtime, refreshed every minute by the holder, is older than ten minutes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { partialName, processAlive, readRegularFileSync } from './files.ts';

export interface LockRecord {
  script: string;
  pid: number;
  host: string;
  /** The kernel's boot id: a pid from an earlier boot means nothing now. */
  bootId?: string;
  /** The process's start time in clock ticks since boot (/proc/PID/stat field 22). */
  procStart?: string;
  started: string;
}

export class LockHeld extends Error {
  constructor(
    readonly lockFile: string,
    readonly holder: Partial<LockRecord>,
  ) {
    const who = [
      holder.pid && `pid ${holder.pid}`,
      holder.host && `on ${holder.host}`,
      holder.started && `since ${holder.started}`,
    ];
    super(`another run holds the lock ${lockFile} (${who.filter(Boolean).join(' ') || 'being taken'})`);
  }
}

/** The lock could not be written at all (a read-only or full state directory). */
export class LockError extends Error {}

const HEARTBEAT_MS = 60_000;
const FOREIGN_STALE_MS = 10 * 60_000;

function readProc(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

const bootId = () => readProc('/proc/sys/kernel/random/boot_id')?.trim();

/** Field 22 of /proc/PID/stat (after the command name, which may hold spaces and parentheses). */
export function processStart(pid: number): string | undefined {
  const stat = readProc(`/proc/${pid}/stat`);
  if (!stat) return undefined;
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
}

/** Whether the lock's holder is still running this script, as far as this host can tell. */
export function isHeld(record: Partial<LockRecord>, script: string, ageMs: number): boolean {
  if (record.host && record.host !== os.hostname()) return ageMs < FOREIGN_STALE_MS;
  const pid = record.pid;
  if (!Number.isInteger(pid) || pid! <= 0) return false;
  if (record.bootId && bootId() && record.bootId !== bootId()) return false;
  if (!processAlive(pid!)) return false;
  // The same process, not another that was given the pid since (no /proc: alive is all we know).
  return record.procStart ? processStart(pid!) === record.procStart : true;
}

function readRecord(lockFile: string): { record: Partial<LockRecord>; ageMs: number; ino: number } | undefined {
  try {
    const st = fs.lstatSync(lockFile);
    const text = readRegularFileSync(lockFile).toString('utf8');
    let record: Partial<LockRecord>;
    try {
      record = JSON.parse(text) as Partial<LockRecord>;
    } catch {
      record = {}; // not a lock record: nobody holds it
    }
    return { record: record ?? {}, ageMs: Date.now() - st.mtimeMs, ino: st.ino };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    // Not a regular file, or unreadable: not a lock anyone holds; it is moved aside below.
    return { record: {}, ageMs: Infinity, ino: -1 };
  }
}

/** Takes the lock or throws LockHeld at once (LockError if it cannot be written). Returns the release function. */
export function acquireLock(lockFile: string, script: string): () => void {
  const dir = path.dirname(lockFile);
  const mine: LockRecord = {
    script,
    pid: process.pid,
    host: os.hostname(),
    bootId: bootId(),
    procStart: processStart(process.pid),
    started: new Date().toISOString(),
  };
  const tmp = partialName(lockFile);
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    fs.writeFileSync(tmp, JSON.stringify(mine) + '\n', { mode: 0o600, flag: 'wx' });
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    const err = e as NodeJS.ErrnoException;
    throw new LockError(`cannot write the lock in ${dir} (${err.code ?? err.message})`);
  }
  try {
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        fs.linkSync(tmp, lockFile); // fails if a lock is there: the check and the take are one step
        return holdLock(lockFile, mine);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code !== 'EEXIST')
          throw new LockError(`cannot take the lock ${lockFile} (${code ?? (e as Error).message})`);
      }
      const found = readRecord(lockFile);
      if (!found) continue; // released meanwhile
      if (isHeld(found.record, script, found.ageMs)) throw new LockHeld(lockFile, found.record);
      // Stale. Moved aside rather than deleted, and only if it is still the file judged stale: a
      // starter racing us may have taken the lock meanwhile.
      const aside = `${tmp}.stale`;
      try {
        fs.renameSync(lockFile, aside);
        if (fs.lstatSync(aside).ino !== found.ino && found.ino !== -1) {
          try {
            fs.linkSync(aside, lockFile); // someone else's fresh lock: put it back
          } catch {
            /* a third starter took it: theirs */
          }
        }
      } catch {
        /* gone meanwhile */
      }
      fs.rmSync(aside, { force: true });
    }
    throw new LockHeld(lockFile, {});
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

function holdLock(lockFile: string, mine: LockRecord): () => void {
  const ours = () => {
    const found = readRecord(lockFile);
    return found?.record.pid === mine.pid && found.record.host === mine.host && found.record.started === mine.started;
  };
  // The heartbeat tells other hosts sharing the directory that the holder is alive.
  const heartbeat = setInterval(() => {
    try {
      if (ours()) fs.utimesSync(lockFile, new Date(), new Date());
    } catch {
      /* best effort */
    }
  }, HEARTBEAT_MS);
  heartbeat.unref();
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    clearInterval(heartbeat);
    try {
      if (ours()) fs.unlinkSync(lockFile);
    } catch {
      /* already gone */
    }
  };
  process.once('exit', release);
  return release;
}
