"""Two torchrun node launchers (--nnodes 2, one process each) rendezvous at --master_addr/--master_port and
train the step that one process takes with the same global batch."""

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import (
    REPO,
    free_port,
    lora_args,
    run_inprocess,
    run_timed,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    torchrun,
    write_chat_data,
)
from trainer.train_lora import main


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_process(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tokenizer_dir()
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 16)
    flags = dict(max_steps=1, learning_rate=1e-2)
    assert run_inprocess(main, lora_args(tmp_path, weight, data, save_dir=tmp_path / "one", batch_size=8,
                                         **flags)) == 0

    def two_nodes(save_dirs: tuple, *extra: str):
        port = free_port()

        def node(rank: int):
            cmd = torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                           "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(REPO / "trainer" / "train_lora.py"),
                           *lora_args(tmp_path, weight, data, save_dir=save_dirs[rank], batch_size=4, **flags), *extra)
            return run_timed(cmd, cwd=tmp_path, env=subprocess_env(), timeout=180)

        with ThreadPoolExecutor(2) as pool:
            return tuple(pool.map(node, (0, 1)))

    node0, node1 = two_nodes((tmp_path / "nodes", tmp_path / "nodes"))
    assert node0.returncode == 0, node0.output[-3000:]
    assert node1.returncode == 0, node1.output[-3000:]
    assert "2 process(es) on cpu" in node0.output and "done:" in node0.output
    assert "step 1/1" not in node1.output  # rank 1 (node 1) neither logs nor saves

    one = load_file(tmp_path / "one" / "lora_identity_64" / "adapter_model.safetensors")
    two = load_file(tmp_path / "nodes" / "lora_identity_64" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    assert max(t.abs().max() for k, t in two.items() if "lora_B" in k) > 1e-3  # the step did move B

    # Resuming where the nodes do not share --save_dir: node 0 finds the resume file, node 1 does not. Both
    # stop at once with the reason, instead of training from different steps.
    node0, node1 = two_nodes((tmp_path / "nodes", tmp_path / "elsewhere"), "--from_resume", "1", "--max_steps", "2")
    for run in (node0, node1):
        assert run.returncode != 0
        assert "the ranks disagree on the step to continue from (rank 0: 1, rank 1: 0)" in run.output, run.output
        assert "--save_dir must be a folder that all of them see" in run.output
