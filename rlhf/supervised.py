"""What steps 1 and 2 share: the language-model loss (also step 3's PTX loss), the run's setup, and
the loop of micro batches with evaluations, logging and the final checkpoint."""
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedModel, set_seed

from rlhf.data import build_datasets
from rlhf.data.loaders import make_loader
from rlhf.distributed import all_sum, init_distributed, rank, world_size
from rlhf.engines import build_engine
from rlhf.hf_models import load_config, prepare_model, save_hf
from rlhf.log import Log


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood (in fp32) and the number of scored tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, (labels != -100).sum()


def steps_per_run(loader: DataLoader, args) -> int:
    """Optimizer steps of the whole run (the schedule's length); refuses a run with none."""
    steps = len(loader) * args.num_train_epochs // args.gradient_accumulation_steps
    if steps == 0:
        raise ValueError(f"no optimizer step: {len(loader.dataset)} training records per run, "
                         f"--per_device_train_batch_size {args.per_device_train_batch_size} x "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x {world_size()} ranks")
    return steps


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_micro(engine, loss_fn, batch: dict) -> tuple[float, int, bool]:
    """Forward and backward of one micro batch; the engine steps the optimizer at accumulation boundaries
    (counted over the whole run, so a window may span two epochs)."""
    batch = to_device(batch, engine.device)
    boundary = engine.is_gradient_accumulation_boundary()  # asked before step(), which advances the count
    loss = loss_fn(engine.module, batch)
    engine.backward(loss)
    engine.step()
    return loss.item(), int(batch["attention_mask"].sum()), boundary


def run_training(engine, loader: DataLoader, loss_fn, evaluate, log, args) -> None:
    """Epochs of micro batches; loss_fn(module, batch) -> loss. Evaluates before training, after each
    epoch and every --eval_interval optimizer steps; logs every optimizer step."""
    log.eval(0, evaluate())
    step, loss_sum, tokens, start = 0, 0.0, 0, time.perf_counter()
    for epoch in range(args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        for micro, batch in enumerate(loader, 1):
            loss, n, boundary = train_micro(engine, loss_fn, batch)
            loss_sum, tokens = loss_sum + loss, tokens + n
            if args.print_loss:
                print(f"rank {rank()} epoch {epoch} micro {micro} loss {loss:.4f}", flush=True)
            if boundary:
                step += 1
                total_loss, total_tokens = all_sum(loss_sum, tokens)
                log.step(step, total_loss / (args.gradient_accumulation_steps * world_size()), engine.get_lr()[0],
                         int(total_tokens), time.perf_counter() - start)
                loss_sum, tokens, start = 0.0, 0, time.perf_counter()
                if args.eval_interval and step % args.eval_interval == 0:
                    log.eval(step, evaluate())
        log.eval(step, evaluate())


def load_run(args, stage: int):
    """Distributed init, seed, config, tokenizer and the stage's (train, eval) datasets."""
    device = init_distributed()
    set_seed(args.seed)
    config = load_config(args.model_name_or_path, args.dropout, args.max_seq_len)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train, evalset = build_datasets(args.data_path, args.data_split, stage, tokenizer, seed=args.seed,
                                    max_seq_len=args.max_seq_len, output_path=args.data_output_path,
                                    sft_only_data_path=args.sft_only_data_path if stage == 1 else ())
    return device, config, tokenizer, train, evalset


def train_and_save(args, model: PreTrainedModel, tokenizer, datasets: tuple, collate, loss_fn, evaluate,
                   desc: str, extra_files=None) -> None:
    """The run both steps share: loaders, engine, epochs with evals, then the HF checkpoint (and the
    files extra_files(plain_model, directory) writes beside it). evaluate(engine, eval_loader, eval_iters)
    -> metrics."""
    train_loader = make_loader(datasets[0], args.per_device_train_batch_size, collate, True, args.seed)
    eval_loader = make_loader(datasets[1], args.per_device_eval_batch_size, collate, False, args.seed)
    steps = steps_per_run(train_loader, args)
    engine = build_engine(prepare_model(model, args), args, steps)
    log = Log(args.output_dir, steps, rank(), args.tensorboard_path if args.enable_tensorboard else None, desc)
    run_training(engine, train_loader, loss_fn, lambda: evaluate(engine, eval_loader, args.eval_iters), log, args)
    save_hf(engine, tokenizer, args.output_dir, extra_files)
    log.close()
