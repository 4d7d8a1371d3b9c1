"""The QEMU side: guest image build, launching the primary/secondary pair, QMP sessions, checkpoints."""
