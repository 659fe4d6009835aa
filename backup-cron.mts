#!/bin/sh
':' //; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are read by sh and ignored by Node: lib/launch.sh starts Node with this
// script, found beside it whatever the working directory. See README "How the scripts run".)

// backup-cron: run hourly on Verda by root's cron (see ./install). Verda's identity and firewall
// config to SFS, which survives the instance, then backup-mello on Mello over SSH. Needs no R2.
import fs from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { CRON_KINDS, archiveStep, configArchives, listArchive, presentEntries } from './lib/archive.ts';
import { errorText } from './lib/cli.ts';
import { requireDirOrAbsent } from './lib/config.ts';
import { runScript, type Step } from './lib/plan.ts';
import { copyWarnings, newestLocal, rotateLocal, rotationStep, timestamp } from './lib/rotation.ts';
import { LocalHost, openHost } from './lib/ssh.ts';

// Run on Mello with the directory and flags as arguments, never as code. `~` is Mello's home
// (the user backup-cron logs in as), not root's on Verda, so it is expanded there.
const TRIGGER = `d=$1; shift
case $d in '~') d=$HOME ;; '~/'*) d=$HOME/\${d#'~/'} ;; esac
cd -- "$d" && exec ./backup-mello.mts "$@"`;

/** How long backup-mello on Mello may go without printing a line before this run gives up on it. */
const TRIGGER_IDLE_LIMIT_MS = 6 * 3600_000;

/** Calls `each` with every complete line written to it, and the rest at the end. */
function lineSink(each: (line: string) => void) {
  let rest = '';
  const feed = (text: string) => {
    const lines = (rest + text).split('\n');
    rest = lines.pop() ?? '';
    lines.forEach(each);
  };
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      feed(chunk.toString());
      cb();
    },
  });
  return { stream, feed, flush: () => rest && each(rest) };
}

await runScript({
  name: 'backup-cron',
  title: (f) => `=== Verda config → SFS, then Mello user files → R2 (${f.verify ? 'verify' : f.quick ? 'quick' : 'full'}) ===`,
  usage: `Usage: backup-cron.mts [--full | --quick] [--dry-run | --verify] [--json] [-v] [--env-file PATH]

Run hourly on Verda as root by cron (installed by ./install). Archives tailscale identity, SSH host
keys, fail2ban, ufw and the project .env into SFS_BACKUP_DIR as KIND-YYYYMMDD-HHMMSS.tar.gz; an
archive whose content equals its newest copy there is not written again; KEEP_BACKUPS copies of
each kind are kept. Then runs backup-mello.mts in MELLO_SCRIPTS_DIR on MELLO_HOST over SSH. If
Mello cannot be reached the SFS copies stand and the run exits 1.
--quick: the same SFS copies (they are all small config); Mello's run is --quick (no outputs).
--verify: checks that the newest SFS copy of each kind is a whole archive, and runs
backup-mello.mts --verify on Mello (--deep is passed on).`,
  plan(cfg, flags) {
    requireDirOrAbsent(cfg, 'SFS_BACKUP_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    const dir = cfg.sfsBackupDir;
    // Cron runs on Verda itself: the sources are read right here, through VERDA_SUDO.
    const verda = new LocalHost(cfg.verdaSudo, cfg.limits.commandIdleTimeoutMs);
    const specs = configArchives(cfg).filter((s) => CRON_KINDS.includes(s.kind));

    // The raw value, so that `~` means the home on Mello (see TRIGGER).
    const melloDir = cfg.env.MELLO_SCRIPTS_DIR || '~/projects/comfymulti-scripts';
    const melloFlags = [
      ...(flags.verify ? ['--verify', ...(flags.deep ? ['--deep'] : [])] : []),
      flags.quick ? '--quick' : '--full',
      ...(flags.verbose ? ['--verbose'] : []),
    ];
    const mello = `Mello (MELLO_HOST=${cfg.melloHost})`;
    const trigger: Step = {
      name: 'Trigger backup-mello on Mello',
      moves: `${cfg.melloHost}: cd ${melloDir} && ./backup-mello.mts ${melloFlags.join(' ')}`,
      async run(ctx) {
        if (ctx.dryRun) return { summary: `would run backup-mello.mts ${melloFlags.join(' ')} in ${melloDir} on ${mello}` };
        let host;
        try {
          host = await openHost(cfg.melloHost, { configFile: cfg.sshConfig, sudo: [], signal: ctx.signal, limits: cfg.limits });
        } catch (e) {
          if (ctx.signal.aborted) throw e;
          throw new Error(`${mello} cannot be reached: ${errorText(e)}; the SFS copies above stand`);
        }
        // Mello's lines, for the log with -v; its summary and failures are reported in any case.
        const kept: string[] = [];
        const sink = lineSink((line) => {
          ctx.out.detail(`mello: ${line}`);
          if (/^\s*(✗|===)/.test(line)) kept.push(line.trim());
          if (kept.length > 20) kept.shift();
        });
        try {
          const r = await host.stream(['sh', '-c', TRIGGER, 'sh', melloDir, ...melloFlags], sink.stream, {
            signal: ctx.signal,
            onStderr: sink.feed,
            // backup-mello prints a line per step, and a first upload of outputs can take hours;
            // it bounds each of its own requests, and ServerAlive notices a dead link.
            idleTimeoutMs: TRIGGER_IDLE_LIMIT_MS,
          });
          sink.flush();
          const last = kept.filter((l) => l.startsWith('===')).pop();
          if (r.code === 0) return { summary: `backup-mello on ${cfg.melloHost}: ${last ?? 'done'}` };
          // 75: another run holds Mello's lock. It may be doing this job, or it may be stuck: this
          // run did not do its work, and says so (a lock held for days must not pass as "skipped").
          if (r.code === 75) {
            const held = r.stderr.trim().split('\n').filter((l) => l.includes('holds the lock')).pop();
            return {
              summary: `backup-mello on ${cfg.melloHost} did not run: another run holds its lock`,
              failures: [`mello: ${held?.replace(/^backup-mello: /, '') ?? 'lock held (exit 75)'}`],
            };
          }
          const said = kept.filter((l) => l.startsWith('✗')).map((l) => l.replace(/^✗\s*/, ''));
          const why = said.length ? said : [r.stderr.trim().split('\n').pop() || 'no output'];
          return {
            summary: `backup-mello on ${cfg.melloHost} exited ${r.code}${r.code === 255 ? ' (SSH connection lost)' : ''}`,
            failures: why.map((l) => `mello: ${l}`),
          };
        } finally {
          await host.close();
        }
      },
    };

    if (flags.verify) {
      const verifySteps: Step[] = specs.map((spec) => ({
        name: `${spec.title}: newest copy`,
        moves: `${dir}/${spec.kind}-*.tar.gz`,
        async run(ctx) {
          const newest = newestLocal(dir, spec.kind, 'tar.gz');
          if (!newest) {
            const present = await presentEntries(verda, spec, ctx.signal);
            if (present.length) throw new Error(`no copy of ${spec.kind} in ${dir}, though its source exists`);
            return { status: 'skipped', summary: 'no copy', warnings: [`${spec.base}: none of ${spec.entries.join(', ')} exists; no copy expected`] };
          }
          const name = path.basename(newest);
          let entries: string[];
          try {
            entries = await listArchive(newest);
          } catch (e) {
            throw new Error(`${name} is not a whole archive (${errorText(e)})`);
          }
          const mode = fs.statSync(newest).mode & 0o777;
          const warnings = mode === 0o600 ? [] : [`${name} has mode ${mode.toString(8)}, not 600`];
          return { summary: `${name}: whole, ${entries.length} entries`, warnings, data: { file: newest, entries } };
        },
      }));
      return { steps: [...verifySteps, trigger] };
    }

    const stamp = timestamp();
    const artifactSteps = specs.map((spec) =>
      archiveStep({ host: verda, spec, dir, stamp, dedupe: (d, kind) => newestLocal(d, kind, 'tar.gz') }),
    );

    const rotation = rotationStep({
      where: dir,
      keep: cfg.keepBackups,
      rotate: async () => specs.flatMap((s) => rotateLocal(dir, s.kind, 'tar.gz', cfg.keepBackups)),
      inspect: () => specs.flatMap((s) => copyWarnings(dir, s.kind, 'tar.gz')),
    });

    return { steps: [...artifactSteps, rotation, trigger], workDirs: [dir] };
  },
});
