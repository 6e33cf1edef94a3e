"""rlhf.chat: answers match transformers' greedy generate, stream as they grow, stop at the next human
turn, keep the conversation as context (trimmed to the model's positions), and the command works
once (--prompt) and interactively through a pseudo-terminal (clear, a second turn, quit, Ctrl-C, Ctrl-D)."""
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf import example
from rlhf.chat import interact
from rlhf.conversation import HUMAN, Chat, complete, human_turn, load_actor, resolve_checkpoint, visible_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("chat") / "actor")
    example.write_model(path, size="tiny", seed=7)
    return path


def hf_greedy(path: str, text: str, max_new_tokens: int) -> str:
    """The oracle: transformers' generate, greedy, on the same context, cut at the next human turn."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return visible_answer(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), final=True)[0]


def env() -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def test_visible_answer_cuts_and_holds_back():
    assert visible_answer("cat dog Human: more", final=False) == ("cat dog", True)
    assert visible_answer("cat dog Hum", final=False) == ("cat dog", False)  # may still become "Human:"
    assert visible_answer("cat dog Hum", final=True) == ("cat dog Hum", False)
    assert visible_answer("cat \ufffd", final=False) == ("cat", False)  # half a character


def test_replies_match_transformers_and_stream(checkpoint):
    model, tokenizer = load_actor(checkpoint, "fp32")
    chat = Chat(model, tokenizer, max_new_tokens=12, sampling=GREEDY, seed=0)
    seen = []
    first = chat.reply("tell me about food", seen.append)
    assert first == hf_greedy(checkpoint, human_turn("tell me about food"), 12) and first
    assert len(seen) > 3 and seen[-1] == first  # token by token, not once at the end
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    # the second turn is generated from the whole conversation
    second = chat.reply("name music things")
    context = human_turn("tell me about food") + " " + first + human_turn("name music things")
    assert second == hf_greedy(checkpoint, context, 12)
    assert chat.context_len == len(tokenizer(context)["input_ids"])


def test_batch_complete_matches_chat(checkpoint):
    model, tokenizer = load_actor(checkpoint, "fp32")
    prompts = [human_turn("tell me about food"), human_turn("list some space words please")]
    answers = complete(model, tokenizer, prompts, 10, do_sample=False)
    assert answers == [hf_greedy(checkpoint, p, 10) for p in prompts]


def test_stops_at_the_next_human_turn(checkpoint, tmp_path):
    """A model that always writes "Human:" gives an empty answer and is stopped at once."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    human = tokenizer.convert_tokens_to_ids(HUMAN)
    with torch.no_grad():  # constant final hidden state aligned with the (tied) embedding of "Human:"
        direction = torch.randn(model.config.hidden_size)
        model.model.decoder.final_layer_norm.weight.zero_()
        model.model.decoder.final_layer_norm.bias.copy_(direction)
        model.model.decoder.embed_tokens.weight[human] = 10 * direction
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    chat = Chat(*load_actor(str(tmp_path), "fp32"), max_new_tokens=20, sampling=GREEDY, seed=0)
    assert chat.reply("tell me about food") == ""
    assert len(chat.new_ids) <= 2  # the first decode step saw "Human:" and stopped the generation


def test_context_trimmed_to_the_positions(checkpoint, capsys):
    model, tokenizer = load_actor(checkpoint, "fp32")
    max_new = model.max_positions - 24
    chat = Chat(model, tokenizer, max_new_tokens=max_new, sampling=GREEDY, seed=0)
    for message in ["tell me about food", "name music things", "say words about space", "list some tools words"]:
        chat.reply(message)
        assert chat.context_len <= model.max_positions - max_new
    assert capsys.readouterr().out.count("oldest part is dropped") == 1  # said once
    assert chat.turns[-1].startswith(human_turn("list some tools words"))


def test_step3_folder_and_reward_model(checkpoint, tmp_path):
    step3 = tmp_path / "step3"
    step3.mkdir()
    os.symlink(checkpoint, step3 / "actor")
    assert resolve_checkpoint(str(step3)) == str(step3 / "actor")
    with pytest.raises(ValueError, match="no checkpoint there"):
        resolve_checkpoint(str(tmp_path / "missing"))
    rm = tmp_path / "rm"
    rm.mkdir()
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    json.dump({**config, "architectures": ["OPTForSequenceClassification"]}, open(rm / "config.json", "w"))
    with pytest.raises(ValueError, match="reward model"):
        load_actor(str(rm))


def test_prompt_once(checkpoint):
    cmd = [sys.executable, "-m", "rlhf.chat", "--path", checkpoint, "--prompt", "tell me about food",
           "--max_new_tokens", "12", "--greedy"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr
    expected = hf_greedy(checkpoint, human_turn("tell me about food"), 12)
    assert out.stdout.strip() == f"Assistant: {expected}", out.stdout


class Terminal:
    """rlhf.chat on a pseudo-terminal (its controlling terminal: ^C and ^D act as on a real one)."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            # A job started in the background (`cmd &`, nohup) inherits SIGINT ignored, and so would the
            # child: a terminal session has it at the default, for Python to turn into KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "rlhf.chat", *args], env())
        self.output = ""

    def read_until(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.output)):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {pattern!r} after {timeout}s; output:\n{self.output}")
            try:
                self.output += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"exited before {pattern!r}; output:\n{self.output}") from None
        self.output = self.output[match.end():]
        return match

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait_until_reading(self, timeout: float = 60) -> None:
        """Until the child's main thread sleeps in read/poll/select (input() waiting for a line): a
        SIGINT sent between the prompt's write and that call is only seen after the next line."""
        waiting_calls = {"0", "7", "23", "270", "271"}  # x86-64 read, poll, select, pselect6, ppoll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/syscall") as f:
                call = f.read().split()[0]
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "S" and call in waiting_calls:
                return
            time.sleep(0.05)
        raise AssertionError(f"not waiting for input after {timeout}s; output:\n{self.output}")

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.output += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        state = self.kernel_state()
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"still running after {timeout}s; {state}; output:\n{self.output}")

    def kernel_state(self) -> str:
        """What the kernel says of the child: where it sleeps and its signal masks (a hang's evidence)."""
        fields = ("State", "Threads", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
        with open(f"/proc/{self.pid}/status") as f:
            status = [line.strip() for line in f if line.startswith(fields)]
        with open(f"/proc/{self.pid}/syscall") as f, open(f"/proc/{self.pid}/wchan") as w:
            return f"syscall {f.read().split()[0]}, wchan {w.read()}, {', '.join(status)}"


def turn(term: Terminal, message: str) -> tuple[str, int]:
    """Send a message at the prompt; (the streamed answer, context tokens it was generated from)."""
    term.read_until(r"Human: $")
    term.send(message + "\n")
    match = term.read_until(r"Assistant: ([^\r\n]*)\r?\n\[context: (\d+) tokens\]")
    return match.group(1), int(match.group(2))


def test_interactive_session(checkpoint):
    term = Terminal("--path", checkpoint, "--max_new_tokens", "10", "--greedy", "--show_context")
    first, context1 = turn(term, "tell me about food")
    assert first == hf_greedy(checkpoint, human_turn("tell me about food"), 10)
    second, context2 = turn(term, "name music things")
    # the second turn's context is the first turn (message and answer) plus the new message
    tokens_of_answer = len(first.split())  # the example tokenizer has one token per word
    assert context2 == context1 + tokens_of_answer + len(human_turn("name music things").split())
    term.read_until(r"Human: $")
    term.send("clear\n")
    term.read_until(r"\[new conversation\]")
    again, context3 = turn(term, "tell me about food")
    assert (again, context3) == (first, context1)  # nothing left of the earlier turns
    term.read_until(r"Human: $")
    term.send("quit\n")
    assert term.exit_code() == 0
    assert "Traceback" not in term.output


def test_ctrl_c_leaves_cleanly(checkpoint):
    term = Terminal("--path", checkpoint, "--max_new_tokens", "4")
    term.read_until(r"Human: $")
    term.wait_until_reading()  # a person is never fast enough to press it before input() reads
    term.send("\x03")  # the terminal turns it into SIGINT
    assert term.exit_code() == 0
    assert "Traceback" not in term.output


def test_end_of_input_leaves(checkpoint, monkeypatch, capsys):
    """Ctrl-D on a terminal is end of input: input() raises EOFError (here without a terminal)."""
    lines = iter(["tell me about food"])

    def fake_input(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    chat = Chat(*load_actor(checkpoint, "fp32"), max_new_tokens=4, sampling=GREEDY, seed=0)
    interact(chat, show_context=False)
    answers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 1 and len(chat.turns) == 1
