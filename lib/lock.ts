// One run per script at a time. The lock is a file created exclusively, holding the owner's pid;
// a lock whose owner is gone (crash, kill -9, reboot) is taken over.
import fs from 'node:fs';
import path from 'node:path';

export class LockHeld extends Error {
  constructor(
    readonly lockFile: string,
    readonly pid: number,
  ) {
    super(`another run holds the lock ${lockFile} (pid ${pid})`);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Takes the lock or throws LockHeld at once. Returns the release function. */
export function acquireLock(lockFile: string): () => void {
  fs.mkdirSync(path.dirname(lockFile), { recursive: true, mode: 0o700 });
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = fs.openSync(lockFile, 'wx', 0o600);
      fs.writeSync(fd, `${process.pid}\n`);
      fs.closeSync(fd);
      let released = false;
      const release = () => {
        if (released) return;
        released = true;
        // Only remove the lock if it is still ours.
        try {
          if (fs.readFileSync(lockFile, 'utf8').trim() === String(process.pid)) fs.unlinkSync(lockFile);
        } catch {
          /* already gone */
        }
      };
      process.once('exit', release);
      return release;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    let pid = NaN;
    let ageMs = Infinity;
    try {
      pid = Number.parseInt(fs.readFileSync(lockFile, 'utf8'), 10);
      ageMs = Date.now() - fs.statSync(lockFile).mtimeMs;
    } catch {
      continue; // removed meanwhile: try again
    }
    if (Number.isInteger(pid) && pid > 0 && alive(pid)) throw new LockHeld(lockFile, pid);
    // An empty lock file is one being written right now by another starter.
    if (!Number.isInteger(pid) && ageMs < 10_000) throw new LockHeld(lockFile, 0);
    // Stale: its owner is gone. Remove it and try again (another starter may race us to it).
    try {
      fs.unlinkSync(lockFile);
    } catch {
      /* someone else removed it */
    }
  }
  throw new LockHeld(lockFile, 0);
}
