// A fixture Verda: system files under a sysroot, a dev home with a project, models on "SFS",
// with the modes, odd names and excluded directories the archives must get right.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { writeRandomFile } from './helpers.ts';

export const ENV_SECRET = 'HF_TOKEN=hf_fixture_secret_4242';

export interface VerdaFixture {
  root: string;
  sysroot: string;
  home: string;
  project: string;
  models: string;
  sfsBackups: string;
  /** Environment for the scripts: where this Verda's paths are. */
  env: Record<string, string>;
}

export const ODD = ['with space.txt', `it's "quoted".txt`, '$(touch PWNED).txt', 'new\nline.txt', 'ünï 日本.txt'];

function put(file: string, content: string | Buffer, mode = 0o644) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content);
  fs.chmodSync(file, mode);
}

export function makeVerda(root: string): VerdaFixture {
  const sysroot = path.join(root, 'sys');
  const home = path.join(root, 'home/dev');
  const project = path.join(home, 'comfy-multi');
  const models = path.join(root, 'sfs/models');
  const sfsBackups = path.join(root, 'sfs/cache/backups');
  const sys = (p: string) => path.join(sysroot, p);

  put(sys('var/lib/tailscale/tailscaled.state'), '{"node-key":"privkey:abc"}', 0o600);
  put(sys('var/lib/tailscale/derpmap.cached.json'), '{}', 0o644);
  put(sys('etc/ssh/ssh_host_ed25519_key'), 'PRIVATE HOST KEY', 0o600);
  put(sys('etc/ssh/ssh_host_ed25519_key.pub'), 'ssh-ed25519 AAAA host', 0o644);
  put(sys('etc/ssh/ssh_host_rsa_key'), 'PRIVATE RSA KEY', 0o600);
  put(sys('etc/ssh/sshd_config'), 'not a host key', 0o644);
  put(sys('etc/fail2ban/jail.local'), '[sshd]\nenabled = true\n');
  put(sys('etc/fail2ban/jail.d/custom.conf'), '[recidive]\nenabled = true\n');
  put(sys('etc/fail2ban/fail2ban.conf'), 'not backed up');
  put(sys('etc/ufw/user.rules'), '*filter\nCOMMIT\n', 0o640);
  put(sys('etc/ufw/user6.rules'), '*filter\nCOMMIT\n', 0o640);
  // lib/ufw/user.rules is absent: the ufw archive holds only those present.

  put(path.join(home, '.zshrc'), 'export ZSH=~/.oh-my-zsh\n');
  put(path.join(home, '.ssh/authorized_keys'), 'ssh-ed25519 AAAA dev', 0o600);
  put(path.join(home, '.cache/pip/big'), 'cache: excluded');
  put(path.join(home, '.local/share/thing'), 'excluded');
  put(path.join(home, '.local/bin/tool'), '#!/bin/sh\necho kept\n', 0o755);
  put(path.join(home, '.npm/_cacache/x'), 'excluded');
  put(path.join(home, '.docker/config.json'), '{"auths":{}}');
  put(path.join(home, 'stray.safetensors'), 'excluded anywhere');
  put(path.join(home, 'notes/.cache/dropped'), '.cache is excluded at any depth, as GNU tar --exclude does');
  put(path.join(home, 'notes/.cache-not/kept'), 'only a whole component matches');
  put(
    path.join(project, '.cache/huggingface/hub/blob'),
    'gigabytes in real life: excluded from home-dev, kept in comfy-project',
  );
  put(path.join(project, 'custom_nodes/n/node_modules/x.js'), 'excluded at any depth');
  put(path.join(home, '.oh-my-zsh/custom/aliases.zsh'), 'alias ll="ls -l"\n');
  put(path.join(home, '.oh-my-zsh/custom/themes/mine.zsh-theme'), 'PROMPT=%\n');
  put(path.join(home, '.oh-my-zsh/oh-my-zsh.sh'), 'not in the custom archive');

  put(path.join(project, '.env'), `${ENV_SECRET}\nR2_SECRET=project_secret_9\n`, 0o600);
  put(path.join(project, 'docker-compose.yml'), 'services: {}\n');
  put(path.join(project, 'scripts/start.sh'), '#!/bin/sh\n', 0o755);
  put(path.join(project, 'data/models/checkpoints/m.safetensors'), 'excluded');
  put(path.join(project, 'data/outputs/user001/o.png'), 'excluded');
  put(path.join(project, 'data/user_data/user001/flow.json'), '{"kept":true}');
  put(path.join(project, 'frontend/node_modules/pkg/index.js'), 'excluded');
  put(path.join(project, 'app/__pycache__/x.pyc'), 'excluded');
  put(path.join(project, 'app/main.py'), 'print("hi")\n');
  for (const n of ODD) put(path.join(project, 'odd', n), `content of ${n}`);
  fs.mkdirSync(path.join(project, 'empty-dir'), { recursive: true });
  fs.utimesSync(path.join(project, 'app/main.py'), new Date('2024-03-01T10:00:00Z'), new Date('2024-03-01T10:00:00Z'));

  put(path.join(models, 'checkpoints/sd_xl_base.safetensors'), crypto.randomBytes(200_000));
  put(path.join(models, 'loras/my lora $(x).safetensors'), crypto.randomBytes(50_000));
  put(path.join(models, 'loras/readme.txt'), 'not a model');
  writeRandomFile(path.join(models, 'unet/big.safetensors'), 20 * 1024 * 1024 + 5);

  return {
    root,
    sysroot,
    home,
    project,
    models,
    sfsBackups,
    env: {
      VERDA_SYSROOT: sysroot,
      VERDA_HOME: home,
      VERDA_PROJECT_DIR: project,
      VERDA_MODELS_DIR: models,
      SFS_BACKUP_DIR: sfsBackups,
      VERDA_SUDO: '',
    },
  };
}
