#!/bin/sh
//bin/true; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are run by sh and are comments to Node: lib/launch.sh starts Node with
// this script, found beside it whatever the working directory. See README "How the scripts run".)

// backup-cron: run hourly on Verda by root's cron (see ./install). Verda's identity and firewall
// config to SFS, which survives the instance, then backup-mello on Mello over SSH. Needs no R2.
import { CRON_KINDS, archiveStep, configArchives, verifyCopyStep } from './lib/archive.ts';
import { requireDirOrAbsent } from './lib/config.ts';
import { RunRecord } from './lib/manifest.ts';
import { runScript } from './lib/script.ts';
import { copyWarnings, timestamp } from './lib/dated.ts';
import { rotateLocal, rotationStep } from './lib/rotation.ts';
import { listCopies } from './lib/sfs.ts';
import { LocalHost } from './lib/ssh.ts';
import { cronStatus } from './lib/status.ts';
import { triggerMelloStep } from './lib/trigger.ts';

await runScript({
  name: 'backup-cron',
  title: (f) =>
    `=== Verda config → SFS, then Mello user files → R2 (${f.verify ? 'verify' : f.quick ? 'quick' : 'full'}) ===`,
  usage: `Usage: backup-cron.mts [--full | --quick] [--dry-run | --verify [--deep]] [--json] [-v] [--env-file PATH]
       backup-cron.mts --status | --list [--json]

Run hourly on Verda as root by cron (installed by ./install). Archives tailscale identity, SSH host
keys, fail2ban, ufw and the project .env into SFS_BACKUP_DIR as KIND-YYYYMMDD-HHMMSS.tar.gz; an
archive whose content equals its newest copy there is not written again; KEEP_BACKUPS copies of
each kind are kept. Then runs backup-mello.mts in MELLO_SCRIPTS_DIR on MELLO_HOST over SSH. If
Mello cannot be reached the SFS copies stand and the run exits 1.
--quick: the same SFS copies (they are all small config); Mello's run is --quick (no outputs).
--verify: checks that the newest SFS copy of each kind is a whole archive, and runs
backup-mello.mts --verify on Mello (--deep is passed on).`,
  status: (cfg) => cronStatus(cfg),
  list: async (cfg, json) => listCopies(cfg.sfsBackupDir, CRON_KINDS, json),
  plan(cfg, flags) {
    requireDirOrAbsent(cfg, 'SFS_BACKUP_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    const dir = cfg.sfsBackupDir;
    // Cron runs on Verda itself: the sources are read right here, through VERDA_SUDO.
    const verda = new LocalHost(cfg.verdaSudo, cfg.limits.commandIdleTimeoutMs);
    const specs = configArchives(cfg).filter((s) => CRON_KINDS.includes(s.kind));
    const trigger = triggerMelloStep({
      melloHost: cfg.melloHost,
      scriptsDir: cfg.melloScriptsDir, // `~` is Mello's
      flags: [
        ...(flags.verify ? ['--verify', ...(flags.deep ? ['--deep'] : [])] : []),
        flags.quick ? '--quick' : '--full',
        ...(flags.verbose ? ['--verbose'] : []),
      ],
      sshConfig: cfg.sshConfig,
      limits: cfg.limits,
    });
    if (flags.verify) return { steps: [...specs.map((spec) => verifyCopyStep({ host: verda, spec, dir })), trigger] };

    const record = new RunRecord(timestamp());
    return {
      steps: [
        ...specs.map((spec) => archiveStep({ host: verda, spec, dir, record, dedupe: true, sfsMount: cfg.sfsMount })),
        rotationStep({
          where: dir,
          keep: cfg.keepBackups,
          rotate: async () => ({ deleted: specs.flatMap((s) => rotateLocal(dir, s.kind, 'tar.gz', cfg.keepBackups)) }),
          inspect: () => specs.flatMap((s) => copyWarnings(dir, s.kind, 'tar.gz')),
        }),
        trigger,
      ],
      workDirs: [dir],
    };
  },
});
