"""Train, evaluate or plot the toy pair: a thin entry point over flowblend.toy.train (see its doc).

    python scripts/train_toy.py --size large --steps 2000 --threads 2
    python scripts/train_toy.py --eval --guidance 4 --shift 3 --sample-steps 20 --seeds 1
"""
from flowblend.toy.train import main

if __name__ == "__main__":
    main()
