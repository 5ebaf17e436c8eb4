// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @title LayerchainLedger: credits, payment channels, node stakes, uptime rewards and slashing
/// @notice The on-chain twin of layerchain's SQLite ledger (src/layerchain/ledger/journal.py):
/// the same rules, with the chain as the clock (block.timestamp) and msg.sender as the actor.
/// Amounts are credits; one credit is `creditWei` wei (fixed at deployment). Clients deposit
/// ether, open one channel per node and sign cumulative EIP-712 vouchers off chain; a node
/// redeems all its channels' latest vouchers in one transaction (redeemMany). Nodes stake,
/// are rewarded from a funded pool for uptime the chain saw paid by clients (bounded by
/// facts paying oneself cannot fake: at most maxBlocks blocks, and a yearly yield of
/// stakeYieldBps on the stake a slash can take), and lose their
/// stake when referees (the deployment's verifiers, who re-run ledger/evidence.check_evidence
/// off chain) sign a guilty verdict on a receipt the node signed.
/// @dev Storage is packed so that a redemption writes one channel slot and one node slot:
/// channel deposits and voucher amounts are uint64 (a voucher cannot promise more), stakes
/// uint128. See contracts/README.md for the layout and the gas each call costs.
contract LayerchainLedger {
    // ---- channel states (the `state` of channel())
    uint8 internal constant NONE = 0;
    uint8 internal constant OPEN = 1;
    uint8 internal constant CLOSING = 2;
    uint8 internal constant CLOSED = 3;

    uint256 internal constant BPS = 10_000;
    uint256 internal constant YEAR_S = 365 days; // the year stake yields are quoted over
    uint256 internal constant RECEIPT_LENGTH = 284; // market/receipts.py canonical bytes
    uint256 internal constant RECEIPT_NODE_OFFSET = 232; // `address node` at [232, 252)
    // secp256k1 order / 2: a signature with a larger s is the malleable twin of a valid one
    uint256 internal constant HALF_N = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;

    bytes32 internal constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 internal constant VOUCHER_TYPEHASH =
        keccak256("Voucher(bytes32 channelId,uint64 nonce,uint64 cumulativeAmount)");
    bytes32 internal constant VERDICT_TYPEHASH =
        keccak256("Verdict(bytes32 evidenceHash,address accuser,address accused,bytes32 receiptHash,bool guilty)");
    bytes32 internal constant NAME_HASH = keccak256("layerchain");
    bytes32 internal constant VERSION_HASH = keccak256("1");

    /// A payer's signed promise, as redeemMany takes it (signature: 65 bytes r||s||v, low s).
    struct Voucher {
        bytes32 channelId;
        uint64 nonce;
        uint64 cumulativeAmount;
        bytes signature;
    }

    // Member order is the slot layout. Opening writes slots 0 and 1; a channel's first
    // redemption makes slot 2 non-zero (a 20,000-gas write; later ones 2,900). Putting deposit with
    // redeemed/nonce instead costs the opening a third zero-to-non-zero slot: 4,000 gas more
    // over a channel's life, measured (contracts/README.md).
    struct ChannelRecord {
        address payer; // slot 0
        uint8 state;
        uint64 closesAt; // unix seconds when a CLOSING channel may be settled
        address payee; // slot 1
        uint64 deposit;
        uint64 redeemed; // slot 2: everything a redemption writes
        uint64 nonce;
        uint64 refunded;
    }

    struct NodeRecord {
        uint128 stake; // slot 0
        uint128 unstaking; // leaving the stake, still slashable until unstakeAt
        uint32 blocks; // slot 1: everything a redemption writes
        uint64 rewardedUntil;
        uint64 servedAt; // the last time a client's voucher paid the node (0: never)
        uint64 earned; // credits redeemed since the last reward (saturates at 2^64-1)
        address payout; // slot 2: receives redeemed credits and rewards (0: the node)
        uint64 registeredAt; // 0: not registered
        uint128 rewards; // slot 3: total rewards paid
        uint64 unstakeAt;
    }

    // ---- errors (contracts/README.md maps each to the Python error type)
    error InsufficientFunds(uint256 have, uint256 need);
    error BadAmount(string reason);
    error BadVoucher(string reason);
    error ChannelState(string reason);
    error NotRegistered();
    error NodeState(string reason);
    error RewardNotDue(string reason);
    error RewardPoolEmpty(uint256 pool, uint256 need);
    error BadEvidence(string reason);
    error BadConfig(string reason);
    error TransferFailed();
    error Reentrant();

    // ---- events: enough to rebuild every balance, channel and stake from the logs
    event Deposited(address indexed account, uint256 credits);
    event Withdrawn(address indexed account, uint256 credits);
    event ChannelOpened(bytes32 indexed id, address indexed payer, address indexed payee, uint256 deposit);
    event ToppedUp(bytes32 indexed id, uint256 amount);
    event Redeemed(bytes32 indexed id, address indexed payee, uint64 nonce, uint64 cumulativeAmount, uint256 credited);
    event CloseRequested(bytes32 indexed id, uint64 closesAt);
    event ChannelClosed(bytes32 indexed id, uint256 refund);
    event NodeRegistered(address indexed node, uint256 stake, uint32 blocks);
    event UnstakeRequested(address indexed node, uint256 amount, uint64 unstakeAt);
    event Unstaked(address indexed node, uint256 amount);
    event PayoutSet(address indexed node, address indexed payout);
    event RewardPaid(address indexed node, uint256 amount, uint64 period);
    event Slashed(
        bytes32 indexed evidenceHash,
        address indexed accuser,
        address indexed accused,
        bytes32 receiptHash,
        bool guilty,
        uint256 slashed,
        uint256 reward,
        uint256 burned,
        uint256 bond
    );
    event RewardsFunded(uint256 credits);

    // ---- configuration (immutable: read from code, not storage)
    uint256 internal immutable CREDIT_WEI;
    uint64 internal immutable DISPUTE_WINDOW_S;
    uint256 internal immutable REWARD_PER_BLOCK_HOUR;
    uint256 internal immutable MIN_STAKE;
    uint64 internal immutable MAX_REWARD_PERIOD_S;
    uint32 internal immutable MAX_BLOCKS;
    uint16 internal immutable STAKE_YIELD_BPS;
    uint256 internal immutable ACCUSER_BOND;
    uint16 internal immutable SLASH_BPS;
    uint16 internal immutable SLASH_REWARD_BPS;
    uint64 internal immutable UNSTAKE_DELAY_S;
    uint8 internal immutable REFEREE_QUORUM;
    uint256 internal immutable CACHED_CHAIN_ID;
    bytes32 internal immutable CACHED_DOMAIN_SEPARATOR;

    // ---- state
    mapping(address => uint256) internal balances;
    mapping(bytes32 => ChannelRecord) internal channels;
    mapping(address => NodeRecord) internal nodes;
    mapping(address => uint64) internal channelNonces;
    mapping(address => bool) internal referees;
    mapping(bytes32 => bool) internal convictedReceipts;
    uint256 internal pool;
    bool transient locked;

    modifier nonReentrant() {
        if (locked) revert Reentrant();
        locked = true;
        _;
        locked = false;
    }

    constructor(
        uint256 creditWei,
        uint64 disputeWindowS,
        uint256 rewardPerBlockHour,
        uint256 minStake,
        uint64 maxRewardPeriodS,
        uint32 maxBlocks,
        uint16 stakeYieldBps,
        uint256 accuserBond,
        uint16 slashBps,
        uint16 slashRewardBps,
        uint64 unstakeDelayS,
        address[] memory refereeList,
        uint8 refereeQuorum
    ) {
        if (creditWei == 0) revert BadConfig("creditWei must be positive");
        if (slashBps > BPS || slashRewardBps > BPS || stakeYieldBps > BPS) {
            revert BadConfig("basis points above 10000");
        }
        if (maxBlocks == 0) revert BadConfig("maxBlocks must be positive");
        if (refereeQuorum == 0 || refereeQuorum > refereeList.length) {
            revert BadConfig("refereeQuorum must be in [1, number of referees]");
        }
        for (uint256 i = 0; i < refereeList.length; i++) {
            if (refereeList[i] == address(0)) revert BadConfig("a referee is the zero address");
            referees[refereeList[i]] = true;
        }
        CREDIT_WEI = creditWei;
        DISPUTE_WINDOW_S = disputeWindowS;
        REWARD_PER_BLOCK_HOUR = rewardPerBlockHour;
        MIN_STAKE = minStake;
        MAX_REWARD_PERIOD_S = maxRewardPeriodS;
        MAX_BLOCKS = maxBlocks;
        STAKE_YIELD_BPS = stakeYieldBps;
        ACCUSER_BOND = accuserBond;
        SLASH_BPS = slashBps;
        SLASH_REWARD_BPS = slashRewardBps;
        UNSTAKE_DELAY_S = unstakeDelayS;
        REFEREE_QUORUM = refereeQuorum;
        CACHED_CHAIN_ID = block.chainid;
        CACHED_DOMAIN_SEPARATOR = _buildDomainSeparator();
    }

    // =========================================================================== views

    /// EIP-712 domain: name "layerchain", version "1", this chain, this contract.
    function domainSeparator() public view returns (bytes32) {
        return block.chainid == CACHED_CHAIN_ID ? CACHED_DOMAIN_SEPARATOR : _buildDomainSeparator();
    }

    function config()
        external
        view
        returns (
            uint256 creditWei,
            uint64 disputeWindowS,
            uint256 rewardPerBlockHour,
            uint256 minStake,
            uint64 maxRewardPeriodS,
            uint32 maxBlocks,
            uint16 stakeYieldBps,
            uint256 accuserBond,
            uint16 slashBps,
            uint16 slashRewardBps,
            uint64 unstakeDelayS,
            uint8 refereeQuorum
        )
    {
        creditWei = CREDIT_WEI;
        disputeWindowS = DISPUTE_WINDOW_S;
        rewardPerBlockHour = REWARD_PER_BLOCK_HOUR;
        minStake = MIN_STAKE;
        maxRewardPeriodS = MAX_REWARD_PERIOD_S;
        maxBlocks = MAX_BLOCKS;
        stakeYieldBps = STAKE_YIELD_BPS;
        accuserBond = ACCUSER_BOND;
        slashBps = SLASH_BPS;
        slashRewardBps = SLASH_REWARD_BPS;
        unstakeDelayS = UNSTAKE_DELAY_S;
        refereeQuorum = REFEREE_QUORUM;
    }

    function isReferee(address account) external view returns (bool) {
        return referees[account];
    }

    /// Spendable credits of `account`.
    function balanceOf(address account) external view returns (uint256) {
        return balances[account];
    }

    /// state: 0 none, 1 open, 2 closing, 3 closed.
    function channel(bytes32 id)
        external
        view
        returns (
            address payer,
            address payee,
            uint256 channelDeposit,
            uint256 redeemed,
            uint64 nonce,
            uint8 state,
            uint64 closesAt,
            uint256 refunded
        )
    {
        ChannelRecord storage c = channels[id];
        return (c.payer, c.payee, c.deposit, c.redeemed, c.nonce, c.state, c.closesAt, c.refunded);
    }

    function node(address account)
        external
        view
        returns (
            uint256 stake,
            uint32 blocks,
            uint64 registeredAt,
            uint64 rewardedUntil,
            uint64 servedAt,
            uint256 earned,
            uint256 rewards,
            uint256 unstaking,
            uint64 unstakeAt,
            address payout
        )
    {
        NodeRecord storage n = nodes[account];
        return (
            n.stake,
            n.blocks,
            n.registeredAt,
            n.rewardedUntil,
            n.servedAt,
            n.earned,
            n.rewards,
            n.unstaking,
            n.unstakeAt,
            n.payout
        );
    }

    /// Channels opened so far by `payer`; the next one's id uses this + 1.
    function channelNonce(address payer) external view returns (uint64) {
        return channelNonces[payer];
    }

    /// True once a guilty verdict on this receipt slashed its node (a receipt convicts once).
    function convicted(bytes32 receiptHash) external view returns (bool) {
        return convictedReceipts[receiptHash];
    }

    /// Credits left to pay uptime rewards with.
    function rewardPool() external view returns (uint256) {
        return pool;
    }

    // ====================================================================== accounts

    /// Credit msg.value / creditWei credits (msg.value: a positive multiple of creditWei).
    function deposit() external payable returns (uint256 balance) {
        uint256 credits = _creditsOf(msg.value);
        balance = balances[msg.sender] + credits;
        balances[msg.sender] = balance;
        emit Deposited(msg.sender, credits);
    }

    /// Send `amount` credits (amount x creditWei wei) of the caller's balance to the caller.
    function withdraw(uint256 amount) external nonReentrant returns (uint256 balance) {
        if (amount == 0) revert BadAmount("withdraw a positive amount");
        balance = _debit(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount * CREDIT_WEI}("");
        if (!ok) revert TransferFailed();
    }

    /// Add msg.value / creditWei credits to the pool uptime rewards are paid from.
    function fundRewards() external payable {
        uint256 credits = _creditsOf(msg.value);
        pool += credits;
        emit RewardsFunded(credits);
    }

    // ====================================================================== channels

    /// Move `amount` credits of the caller's balance into a new channel to `payee`.
    /// id = keccak256(abi.encode(chainid, this contract, payer, channelNonce(payer) + 1)).
    function openChannel(address payee, uint256 amount) external returns (bytes32 id) {
        if (payee == address(0)) revert ChannelState("a channel needs a payee");
        if (payee == msg.sender) revert ChannelState("a channel's payer and payee must differ");
        uint64 amount64 = _voucherAmount(amount, "channel deposit");
        _debit(msg.sender, amount);
        uint64 nonce = channelNonces[msg.sender] + 1;
        channelNonces[msg.sender] = nonce;
        id = keccak256(abi.encode(block.chainid, address(this), msg.sender, nonce));
        ChannelRecord storage c = channels[id];
        c.payer = msg.sender;
        c.state = OPEN;
        c.payee = payee;
        c.deposit = amount64;
        emit ChannelOpened(id, msg.sender, payee, amount);
    }

    /// Add `amount` of the payer's balance to an open channel's deposit.
    function topUp(bytes32 id, uint256 amount) external returns (uint256 newDeposit) {
        ChannelRecord storage c = _payersChannel(id);
        if (c.state != OPEN) revert ChannelState("only an open channel takes a top-up");
        uint64 add = _voucherAmount(amount, "top-up");
        newDeposit = uint256(c.deposit) + add;
        if (newDeposit > type(uint64).max) revert BadAmount("channel deposit would exceed 2^64-1 credits");
        _debit(msg.sender, amount);
        c.deposit = uint64(newDeposit);
        emit ToppedUp(id, amount);
    }

    /// Credit the payee (or its payout address) `cumulativeAmount - redeemed`. Anyone may
    /// submit: a voucher only pays its payee. 0 (no revert, nothing changes) when the voucher
    /// is not newer than the last one redeemed; reverts on a closed channel, an amount above
    /// the deposit, or a signature that is not the payer's.
    function redeem(bytes32 id, uint64 nonce, uint64 cumulativeAmount, bytes calldata sig)
        external
        returns (uint256 credited)
    {
        return _redeem(id, nonce, cumulativeAmount, sig, domainSeparator());
    }

    /// redeem for each voucher, in one transaction; returns the total credited.
    function redeemMany(Voucher[] calldata vouchers) external returns (uint256 total) {
        bytes32 domain = domainSeparator();
        for (uint256 i = 0; i < vouchers.length; i++) {
            Voucher calldata v = vouchers[i];
            total += _redeem(v.channelId, v.nonce, v.cumulativeAmount, v.signature, domain);
        }
    }

    /// Payer only. OPEN: start the dispute window (returns 0; immediate close if the window
    /// is 0). CLOSING and the window over: refund deposit - redeemed to the payer's balance.
    function closeChannel(bytes32 id) external returns (uint256 refund) {
        ChannelRecord storage c = _payersChannel(id);
        uint8 state = c.state;
        if (state == CLOSED) revert ChannelState("channel is already closed");
        if (state == OPEN && DISPUTE_WINDOW_S > 0) {
            uint64 closesAt = uint64(block.timestamp) + DISPUTE_WINDOW_S;
            c.state = CLOSING;
            c.closesAt = closesAt;
            emit CloseRequested(id, closesAt);
            return 0;
        }
        if (state == CLOSING && block.timestamp < c.closesAt) {
            revert ChannelState("channel is in its dispute window");
        }
        refund = uint256(c.deposit) - c.redeemed;
        c.state = CLOSED;
        c.refunded = uint64(refund);
        if (state == OPEN) c.closesAt = uint64(block.timestamp);
        balances[msg.sender] += refund;
        emit ChannelClosed(id, refund);
    }

    // ========================================================================= nodes

    /// Stake `stake` more credits and serve `blocks` blocks, at most maxBlocks (stake may be
    /// 0 once registered, to change the blocks). New blocks or more stake count from now:
    /// the unrewarded period is forfeited (a period's yield is on stake held all of it).
    function registerNode(uint256 stake, uint32 blocks) external returns (uint256 totalStake) {
        NodeRecord storage n = nodes[msg.sender];
        bool known = n.registeredAt != 0;
        if (stake == 0 && !known) revert NodeState("a node registers with a positive stake");
        if (blocks == 0) revert NodeState("a node registers the blocks it serves (at least 1)");
        if (blocks > MAX_BLOCKS) revert NodeState("more blocks than the deployment's maxBlocks");
        totalStake = uint256(n.stake) + stake;
        if (totalStake > type(uint128).max) revert BadAmount("stake would exceed 2^128-1 credits");
        if (totalStake < MIN_STAKE) revert NodeState("the stake is under the deployment's minStake");
        if (stake > 0) _debit(msg.sender, stake);
        n.stake = uint128(totalStake);
        uint64 now64 = uint64(block.timestamp);
        if (!known) {
            n.registeredAt = now64;
            n.rewardedUntil = now64;
            n.blocks = blocks;
        } else if (blocks != n.blocks || stake > 0) {
            n.blocks = blocks;
            n.rewardedUntil = now64;
            n.earned = 0;
        }
        emit NodeRegistered(msg.sender, totalStake, blocks);
    }

    /// Move `amount` of the caller's stake into `unstaking`, withdrawable after the delay
    /// (slashable until then). A new request restarts the delay for everything unstaking.
    function requestUnstake(uint256 amount) external {
        NodeRecord storage n = nodes[msg.sender];
        if (n.registeredAt == 0) revert NotRegistered();
        if (amount == 0) revert BadAmount("unstake a positive amount");
        if (amount > n.stake) revert InsufficientFunds(n.stake, amount);
        uint256 left = n.stake - amount;
        if (left != 0 && left < MIN_STAKE) {
            revert NodeState("the stake left would be under the minimum: unstake all of it or keep minStake");
        }
        uint64 unstakeAt = uint64(block.timestamp) + UNSTAKE_DELAY_S;
        n.stake = uint128(left);
        n.unstaking += uint128(amount);
        n.unstakeAt = unstakeAt;
        emit UnstakeRequested(msg.sender, amount, unstakeAt);
    }

    /// After unstakeAt: move everything unstaking to the caller's balance.
    function completeUnstake() external returns (uint256 amount) {
        NodeRecord storage n = nodes[msg.sender];
        amount = n.unstaking;
        if (amount == 0) revert NodeState("nothing is unstaking");
        if (block.timestamp < n.unstakeAt) revert NodeState("the unstake delay is not over");
        n.unstaking = 0;
        n.unstakeAt = 0;
        balances[msg.sender] += amount;
        emit Unstaked(msg.sender, amount);
    }

    /// Pay the caller's redeemed credits and rewards to `payout` from now on (0: itself).
    function setPayout(address payout) external {
        if (payout == msg.sender) payout = address(0);
        nodes[msg.sender].payout = payout;
        emit PayoutSet(msg.sender, payout);
    }

    /// Uptime reward, as journal._claim_reward: from the last reward to the last time a
    /// client's voucher paid the node (at most maxRewardPeriodS),
    /// min(rewardPerBlockHour x blocks x seconds / 3600, credits redeemed in that time,
    ///     stake x stakeYieldBps / 10000 x seconds / 365 days);
    /// paid from the reward pool to the node's payout. `earned` alone bounds nothing (a
    /// node's own sock puppet can pay it for free); the stake yield does: whoever pays
    /// itself extracts at most the deployment's yield on capital a slash can take.
    function claimReward() external returns (uint256 amount) {
        NodeRecord storage n = nodes[msg.sender];
        if (n.registeredAt == 0 || n.stake == 0) revert NotRegistered();
        uint64 from = n.rewardedUntil;
        uint256 cap = uint256(from) + MAX_REWARD_PERIOD_S;
        uint64 end = n.servedAt < cap ? n.servedAt : uint64(cap);
        if (n.earned == 0 || end <= from) {
            revert RewardNotDue("no client has paid this node since its last reward");
        }
        uint64 period = end - from;
        uint256 byTime = REWARD_PER_BLOCK_HOUR * n.blocks * period / 3600;
        // stake < 2^128, bps < 2^16, period < 2^64: the product fits in 256 bits
        uint256 byStake = uint256(n.stake) * STAKE_YIELD_BPS * period / (BPS * YEAR_S);
        amount = byTime < n.earned ? byTime : n.earned;
        if (byStake < amount) amount = byStake;
        if (amount == 0) revert RewardNotDue("the period rounds to 0 credits so far");
        if (pool < amount) revert RewardPoolEmpty(pool, amount);
        pool -= amount;
        n.rewardedUntil = end;
        n.earned = 0;
        n.rewards += uint128(amount);
        balances[_payoutOf(n, msg.sender)] += amount;
        emit RewardPaid(msg.sender, amount, period);
    }

    /// Settle an accusation. `receipt` is the accused's 284 canonical receipt bytes and
    /// `receiptSig` its EIP-191 signature of keccak256(receipt); `refereeSigs` are EIP-712
    /// Verdict signatures (accuser = msg.sender) by >= refereeQuorum distinct referees,
    /// sorted by signer address ascending. The accuser must hold the bond. Guilty (once per
    /// receipt): the stake and what is unstaking lose slashBps, slashRewardBps of that to the
    /// accuser, the rest burned; returns the slashed credits. Not guilty: the bond goes to
    /// the accused; returns the bond.
    function slash(
        bytes calldata receipt,
        bytes calldata receiptSig,
        bytes32 evidenceHash,
        bool guilty,
        bytes[] calldata refereeSigs
    ) external returns (uint256) {
        (address accused, bytes32 receiptHash) = _receiptSigner(receipt, receiptSig);
        if (accused == msg.sender) revert BadEvidence("a node cannot accuse itself");
        uint256 have = balances[msg.sender];
        if (have < ACCUSER_BOND) revert InsufficientFunds(have, ACCUSER_BOND);
        bytes32 verdict = keccak256(
            abi.encode(VERDICT_TYPEHASH, evidenceHash, msg.sender, accused, receiptHash, guilty)
        );
        _checkReferees(_typedDigest(verdict), refereeSigs);
        if (!guilty) {
            balances[msg.sender] = have - ACCUSER_BOND;
            balances[accused] += ACCUSER_BOND;
            emit Slashed(evidenceHash, msg.sender, accused, receiptHash, false, 0, 0, 0, ACCUSER_BOND);
            return ACCUSER_BOND;
        }
        if (convictedReceipts[receiptHash]) revert BadEvidence("this receipt already convicted its node");
        convictedReceipts[receiptHash] = true;
        uint256 slashed = _takeStake(nodes[accused]);
        uint256 reward = slashed * SLASH_REWARD_BPS / BPS;
        balances[msg.sender] = have + reward;
        emit Slashed(evidenceHash, msg.sender, accused, receiptHash, true, slashed, reward, slashed - reward, 0);
        return slashed;
    }

    // ====================================================================== internals

    function _buildDomainSeparator() internal view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    /// keccak256("\x19\x01" || domainSeparator || structHash)
    function _typedDigest(bytes32 structHash) internal view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    /// The signer of a 65-byte r||s||v signature over `digest`, or 0 when the signature is
    /// malformed: wrong length, v not 27/28, s zero or high (EIP-2), or no key recovers.
    function _recover(bytes32 digest, bytes calldata sig) internal pure returns (address) {
        if (sig.length != 65) return address(0);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := calldataload(sig.offset)
            s := calldataload(add(sig.offset, 32))
            v := byte(0, calldataload(add(sig.offset, 64)))
        }
        if (v != 27 && v != 28) return address(0);
        if (uint256(s) == 0 || uint256(s) > HALF_N) return address(0);
        return ecrecover(digest, v, r, s);
    }

    function _redeem(bytes32 id, uint64 nonce, uint64 cumulativeAmount, bytes calldata sig, bytes32 domain)
        internal
        returns (uint256 credited)
    {
        ChannelRecord storage c = channels[id];
        uint8 state = c.state;
        if (state == NONE) revert ChannelState("unknown channel");
        if (state == CLOSED) revert ChannelState("channel is closed");
        uint64 redeemed = c.redeemed;
        if (nonce <= c.nonce || cumulativeAmount <= redeemed) return 0; // stale or replayed
        if (cumulativeAmount > c.deposit) revert BadVoucher("amount exceeds the channel deposit");
        bytes32 digest = keccak256(
            abi.encodePacked(
                "\x19\x01", domain, keccak256(abi.encode(VOUCHER_TYPEHASH, id, nonce, cumulativeAmount))
            )
        );
        address signer = _recover(digest, sig);
        if (signer == address(0)) revert BadVoucher("malformed signature (65 bytes, v 27 or 28, low s)");
        if (signer != c.payer) revert BadVoucher("not signed by the channel's payer");
        credited = cumulativeAmount - redeemed;
        c.redeemed = cumulativeAmount;
        c.nonce = nonce;
        address payee = c.payee;
        NodeRecord storage n = nodes[payee];
        if (n.registeredAt != 0) {
            // a client's signature attests the node worked until now
            n.servedAt = uint64(block.timestamp);
            uint256 earned = uint256(n.earned) + credited;
            n.earned = earned > type(uint64).max ? type(uint64).max : uint64(earned);
        }
        balances[_payoutOf(n, payee)] += credited;
        emit Redeemed(id, payee, nonce, cumulativeAmount, credited);
    }

    function _payoutOf(NodeRecord storage n, address account) internal view returns (address) {
        address payout = n.payout;
        return payout == address(0) ? account : payout;
    }

    function _payersChannel(bytes32 id) internal view returns (ChannelRecord storage c) {
        c = channels[id];
        if (c.state == NONE) revert ChannelState("unknown channel");
        if (c.payer != msg.sender) revert ChannelState("only the channel's payer may do this");
    }

    function _debit(address account, uint256 amount) internal returns (uint256 balance) {
        uint256 have = balances[account];
        if (have < amount) revert InsufficientFunds(have, amount);
        balance = have - amount;
        balances[account] = balance;
    }

    function _creditsOf(uint256 value) internal view returns (uint256) {
        if (value == 0 || value % CREDIT_WEI != 0) {
            revert BadAmount("send a positive multiple of creditWei wei");
        }
        return value / CREDIT_WEI;
    }

    function _voucherAmount(uint256 amount, string memory what) internal pure returns (uint64) {
        if (amount == 0) revert BadAmount(string.concat(what, " must be positive"));
        if (amount > type(uint64).max) revert BadAmount(string.concat(what, " exceeds 2^64-1 credits"));
        return uint64(amount);
    }

    /// The accused node (the receipt's `address node` field) and keccak256(receipt), once
    /// `sig` is that node's EIP-191 signature of the receipt hash.
    function _receiptSigner(bytes calldata receipt, bytes calldata sig)
        internal
        pure
        returns (address accused, bytes32 receiptHash)
    {
        if (receipt.length != RECEIPT_LENGTH) revert BadEvidence("a receipt is 284 canonical bytes");
        accused = address(bytes20(receipt[RECEIPT_NODE_OFFSET:RECEIPT_NODE_OFFSET + 20]));
        receiptHash = keccak256(receipt);
        bytes32 signed = keccak256(abi.encodePacked("\x19Ethereum Signed Message:\n32", receiptHash));
        address signer = _recover(signed, sig);
        if (signer == address(0) || signer != accused) {
            revert BadEvidence("the receipt is not signed by the node it names");
        }
    }

    /// At least REFEREE_QUORUM signatures of `digest`, by distinct referees in ascending order.
    function _checkReferees(bytes32 digest, bytes[] calldata sigs) internal view {
        if (sigs.length < REFEREE_QUORUM) revert BadEvidence("fewer referee signatures than the quorum");
        address last = address(0);
        for (uint256 i = 0; i < sigs.length; i++) {
            address referee = _recover(digest, sigs[i]);
            if (referee == address(0) || !referees[referee]) {
                revert BadEvidence("a verdict signature is not a referee's");
            }
            if (referee <= last) revert BadEvidence("referee signatures must be distinct, sorted by address");
            last = referee;
        }
    }

    /// Take SLASH_BPS of the stake and of what is unstaking; return the credits taken.
    function _takeStake(NodeRecord storage n) internal returns (uint256 slashed) {
        uint256 stake = n.stake;
        uint256 unstaking = n.unstaking;
        if (stake + unstaking == 0) revert BadEvidence("the accused has no stake to slash");
        uint256 fromStake = stake * SLASH_BPS / BPS;
        uint256 fromUnstaking = unstaking * SLASH_BPS / BPS;
        n.stake = uint128(stake - fromStake);
        n.unstaking = uint128(unstaking - fromUnstaking);
        return fromStake + fromUnstaking;
    }
}
