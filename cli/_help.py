"""The examples at the end of each command's --help, kept apart from the parser so it stays readable.

`add_examples` puts them in as argparse epilogs (raw, so the lines stay as written); docs/cli.md and the shell
completion are generated from the same parser.
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, str] = {
    "capture": """\
  podcap capture shop/checkout-7d9f --filter 'tcp port 443' --duration 30s --download checkout.pcap
  podcap capture checkout-7d9f --duration 1m --wait          # the pod in the default namespace (podcap config)
  podcap capture -n shop -l app=checkout --duration 30s --download all.pcapng
  podcap capture --between shop/frontend-5c4b payments/svc/api --duration 30s --download both.pcapng""",
    "diagnose": """\
  podcap diagnose shop/frontend-5c8d --to checkout:80     # a Service in the pod's namespace
  podcap diagnose shop/frontend-5c8d --to api.example.com:443 --duration 10s -o json""",
    "get": """\
  podcap get 3f2a                   # a unique prefix of the id is enough
  podcap get 3f2a -o yaml""",
    "list": """\
  podcap list -n shop --state COMPLETED --since 2h
  podcap list -o json | jq -r '.[].id'""",
    "download": """\
  podcap download 3f2a -f checkout.pcap
  podcap download 3f2a -f - | wireshark -k -i -
  podcap download 3f2a -f all.pcapng --merge --one-copy""",
    "url": """\
  podcap url 3f2a                   # valid for the controller's --download-url-ttl
  curl -o checkout.pcap "$(podcap url 3f2a)\"""",
    "delete": """\
  podcap delete 3f2a""",
    "stop": """\
  podcap stop 3f2a --wait""",
    "open": """\
  podcap open 3f2a                  # downloads it and starts Wireshark on it
  podcap open 3f2a --target 1       # one pod of a multi-pod capture""",
    "pods": """\
  podcap pods                       # every running pod you may capture, in every namespace
  podcap pods -n shop -o json""",
    "extcap": """\
  podcap extcap install             # then restart Wireshark: pods appear as interfaces namespace/pod
  podcap extcap install --dir ~/.config/wireshark/extcap""",
    "config": """\
  podcap config                     # what is in effect, and where each value comes from
  PODCAP_SERVER=podcap.example:443 podcap config -o yaml""",
    "completion": """\
  source <(podcap completion bash)                     # in ~/.bashrc
  podcap completion zsh > "${fpath[1]}/_podcap"        # zsh, then restart the shell""",
    "token": """\
  podcap token                      # give the token to its user, the hash to the controller's token file""",
    "controller": """\
  podcap controller --listen 127.0.0.1:7070 --no-auth --db sqlite:///podcap.db \\
      --store file:///var/lib/podcap/pcaps --inventory inventory.yaml
  podcap controller --listen 0.0.0.0:7070 --auth-kubernetes --tls-cert api.crt --tls-key api.key \\
      --db postgresql://podcap@db/podcap --store s3://pcaps/captures --in-cluster""",
    "agent": """\
  podcap agent --node-name node-1 --listen 0.0.0.0:7443 --store file:///var/lib/podcap/pcaps""",
}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def add_examples(parser: argparse.ArgumentParser) -> None:
    for name, sub in subcommands(parser).items():
        if name in EXAMPLES and not sub.epilog:
            sub.epilog = "Examples:\n" + EXAMPLES[name]
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
